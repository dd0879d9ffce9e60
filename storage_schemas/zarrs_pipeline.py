"""The zarrs codec pipeline, with every chunk read checked against its CRC32C checksum.

zarrs 0.2.3 validates the `crc32c` codec only when it decodes a whole shard. A read of part of a shard (one
example, some layers, the first `size` positions: what the causal and explanation stages and the efficient stage's
layer pieces read) goes through its partial decoders, which skip the check and return flipped bytes as data
(tests/test_attention_store.py shows both). Such reads go to zarr-python's pipeline here, which checks every chunk
it decodes; whole-shard reads and all writes stay with zarrs. Selected by `use_fast_codec_pipeline`.
"""

from __future__ import annotations

from zarr.registry import register_pipeline
from zarrs import ZarrsCodecPipeline


class ChecksumValidatingZarrsPipeline(ZarrsCodecPipeline):
    """`zarrs.ZarrsCodecPipeline` for writes and whole-chunk (whole-shard) reads; zarr's own pipeline for reads of
    part of a chunk, so that a damaged chunk always fails its checksum instead of being read as data."""

    async def read(self, batch_info, out, drop_axes: tuple[int, ...] = ()) -> None:
        batch_info = list(batch_info)
        if self.python_impl is None:  # codec_pipeline.strict: the user asked for zarrs only
            await super().read(batch_info, out, drop_axes)
            return
        # an item is (byte getter, chunk spec, chunk selection, out selection, is_complete_chunk)
        whole = [item for item in batch_info if item[4]]
        part = [item for item in batch_info if not item[4]]
        if whole:
            await super().read(whole, out, drop_axes)
        if part:
            await self.python_impl.read(part, out, drop_axes)


register_pipeline(ChecksumValidatingZarrsPipeline)  # zarr finds a pipeline named in its config only once registered
