"""The error family of the stores and results datasets, in one leaf module that imports nothing from the project
(so that every storage module can raise them without importing another). Every class is a ValueError: the CLI
prints its message, which says what was wrong and what to do, without a traceback."""

from __future__ import annotations


class AttentionStoreError(ValueError):
    """A store that is not a valid attention store of this schema, or does not match the run using it."""


class AttentionStoreNotFoundError(AttentionStoreError, FileNotFoundError):
    """Nothing exists at the store's URL."""


class IncompleteInputError(AttentionStoreError):
    """A stage was asked to read shards that their producer has not recorded as complete (or that were written
    again since the stage computed from them)."""


class StoreFullError(AttentionStoreError):
    """A write into a store failed for lack of space (disk full, quota exceeded, file size limit)."""


class StoreNotWritableError(AttentionStoreError):
    """This process may not write where the store is (permissions, a read-only filesystem)."""


class StoreLockedError(AttentionStoreError):
    """Another run holds the store's writer lock (or may: a holder on another host cannot be checked)."""


class ResultsDatasetError(AttentionStoreError):
    """A results dataset (storage_schemas.results_dataset) that is not valid, or does not match the run using it."""


class CausalResultsError(ResultsDatasetError):
    """A causal results dataset that is not valid, or does not match the run using it."""


class ExplanationResultsError(ResultsDatasetError):
    """An explanation results dataset that is not valid, or does not match the run using it."""
