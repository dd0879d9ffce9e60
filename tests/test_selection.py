"""Layer / head selections of an attention store: parsing, the recorded attribute, the GQA kv-head mapping."""

import json

import pytest

from storage_schemas.selection import (
    SELECTION_ATTRIBUTE,
    SelectionError,
    StoreSelection,
    parse_index_selection,
    selection_of_store,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0,3,5", (0, 3, 5)),
        ("0-2,5", (0, 1, 2, 5)),
        ("5, 1", (1, 5)),
        (" 2 - 3 ", (2, 3)),
        ("4", (4,)),
        (None, None),
        ("", None),
        ("all", None),
        ("ALL", None),
    ],
)
def test_parse_accepts_lists_ranges_and_all(text, expected):
    assert parse_index_selection(text, 6, "layers") == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("6", "out of range"),
        ("0-6", "out of range"),
        ("1,1", "given twice"),
        ("0-2,2", "given twice"),
        ("3-1", "backwards"),
        ("a", "not an index"),
        ("1,,2", "not an index"),
        ("-1", "not an index"),
        ("1.5", "not an index"),
    ],
)
def test_parse_refuses_bad_text_with_a_message(text, message):
    with pytest.raises(SelectionError, match=message):
        parse_index_selection(text, 6, "heads")


def test_parse_names_what_is_selected():
    with pytest.raises(SelectionError, match=r"--heads .*the model has 4 heads \(0\.\.3\)"):
        parse_index_selection("4", 4, "heads")


def test_gqa_heads_map_to_the_kv_heads_they_read():
    # 8 query heads over 2 kv heads: heads 0-3 read kv 0, heads 4-7 read kv 1
    selection = StoreSelection.parse("0,2", "1,6,7", model_layers=4, model_heads=8, model_kv_heads=2)
    assert selection.kv_heads == (0, 1)
    assert selection.head_kv == (0, 1, 1)
    only_second_group = StoreSelection.parse(None, "5,6", 4, 8, 2)
    assert only_second_group.kv_heads == (1,)
    assert only_second_group.head_kv == (0, 0)
    # without GQA each head is its own kv head
    plain = StoreSelection.parse(None, "1,3", 2, 4, 4)
    assert plain.kv_heads == (1, 3) and plain.head_kv == (0, 1)


def test_a_store_without_the_attribute_holds_everything():
    selection = selection_of_store({}, layers=3, heads=4, kv_heads=2)
    assert selection.is_everything
    assert selection.layers == (0, 1, 2) and selection.heads == (0, 1, 2, 3) and selection.kv_heads == (0, 1)
    assert selection.describe() == "all 3 layers, all 4 heads"


def test_the_recorded_attribute_round_trips_through_json():
    selection = StoreSelection.parse("0,3", "2-3", 6, 4, 2)
    attrs = {SELECTION_ATTRIBUTE: json.loads(json.dumps(selection.to_attribute()))}
    again = selection_of_store(attrs, layers=2, heads=2, kv_heads=1)
    assert again == selection
    assert again.stored_layer(3) == 1 and again.stored_layer(1) is None
    assert again.describe() == "2 of 6 layers (0, 3), 2 of 4 heads (2, 3)"


def test_a_selection_that_disagrees_with_the_arrays_is_refused():
    attrs = {SELECTION_ATTRIBUTE: StoreSelection.parse("0,3", None, 6, 4, 4).to_attribute()}
    with pytest.raises(SelectionError, match="does not match its arrays"):
        selection_of_store(attrs, layers=3, heads=4, kv_heads=4)
    with pytest.raises(SelectionError, match="incomplete"):
        selection_of_store({SELECTION_ATTRIBUTE: {"layers": [0]}}, layers=1, heads=4, kv_heads=4)


def test_a_selection_must_be_distinct_ascending_and_in_range():
    with pytest.raises(SelectionError, match="distinct, ascending"):
        StoreSelection((1, 0), (0,), 2, 2, 2)
    with pytest.raises(SelectionError, match="at least one"):
        StoreSelection((), (0,), 2, 2, 2)
    with pytest.raises(SelectionError, match="multiple of kv heads"):
        StoreSelection((0,), (0,), 2, 3, 2)


def test_a_storable_head_selection_takes_as_many_heads_from_each_kv_head():
    # every stage maps stored head h to stored kv head h // (heads // kv_heads): that must be head_kv
    for heads in ("0-3", "2,3", "1,5", "0,1,6,7", None):
        selection = StoreSelection.parse("1", heads, model_layers=2, model_heads=8, model_kv_heads=2)
        selection.check_storable()
        group = len(selection.heads) // len(selection.kv_heads)
        assert selection.head_kv == tuple(i // group for i in range(len(selection.heads)))
    with pytest.raises(SelectionError, match=r"same number of heads from each kv head used.*\{0: 1, 1: 2\}"):
        StoreSelection.parse(None, "1,6,7", 2, 8, 2).check_storable()
    StoreSelection.parse(None, "1,6,7", 2, 8, 8).check_storable()  # no grouped-query attention: any heads


def test_the_selection_of_an_opened_store_and_the_stages_that_need_everything(tmp_path):
    import zarr

    from storage_schemas.selection import require_everything, selection_of_group

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.attrs.update({"layout": {"layers": 3, "heads": 4, "kv_heads": 2}})
    assert selection_of_group(group).is_everything
    require_everything(group, "g.zarr", "explain")
    group.attrs.update(
        {
            "layout": {"layers": 1, "heads": 4, "kv_heads": 2},
            SELECTION_ATTRIBUTE: StoreSelection.parse("2", None, 3, 4, 2).to_attribute(),
        }
    )
    assert selection_of_group(group).layers == (2,)
    with pytest.raises(
        SelectionError,
        match=r"g.zarr holds 1 of 3 layers \(2\), all 4 heads; `effattn explain` "
        "needs every layer and head",
    ):
        require_everything(group, "g.zarr", "explain")
