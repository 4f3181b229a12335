"""starling_lib.jsonl_cache: the append-only JSONL cache of the evaluations, and content_hash."""

import json

import pytest

from starling_lib.jsonl_cache import JsonlCache, content_hash


def test_records_survive_a_reopen_and_the_last_record_of_a_key_wins(tmp_path):
    path = tmp_path / "sub" / "c.jsonl"  # the folder is made
    cache = JsonlCache(path, ["model", "turn"])
    cache.put({"model": "m", "turn": 1, "v": "first"})
    cache.put({"model": "m", "turn": 2, "v": "other"})
    cache.put({"model": "m", "turn": 1, "v": "second"})
    assert cache.get("m", 1)["v"] == "second" and cache.get("m", 3) is None
    again = JsonlCache(path, ["model", "turn"])
    assert len(again) == 2 and again.get("m", 1)["v"] == "second" and again.num_bad_lines == 0
    assert len(path.read_text().splitlines()) == 3  # append-only: every record is kept in the file


def test_a_torn_last_line_is_skipped_and_the_next_record_does_not_glue_onto_it(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"a": 1, "v": "x"}) + "\n" + '{"a": 2, "v": "torn')
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        cache = JsonlCache(path, ["a"])
    assert cache.num_bad_lines == 1 and cache.get(1)["v"] == "x" and cache.get(2) is None
    cache.put({"a": 2, "v": "y"})
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):  # the torn line stays; the new record follows it
        reread = JsonlCache(path, ["a"])
    assert reread.get(2)["v"] == "y" and len(reread) == 2


def test_lines_that_are_not_records_are_counted_and_blank_lines_ignored(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([json.dumps({"a": 1}), "", json.dumps({"b": 2}), "[1, 2]", "7", "{not json"]) + "\n")
    with pytest.warns(UserWarning, match="skipped 4 unreadable line"):
        cache = JsonlCache(path, ["a"])
    assert len(cache) == 1 and cache.num_bad_lines == 4


def test_a_record_without_its_key_fields_is_refused_before_it_is_written(tmp_path):
    cache = JsonlCache(tmp_path / "c.jsonl", ["a"])
    with pytest.raises(KeyError):
        cache.put({"b": 1})
    assert not (tmp_path / "c.jsonl").exists()


def test_content_hash_is_stable_and_order_sensitive():
    # pinned: caches written before content_hash moved here (as mtbench's private hash) stay valid
    assert content_hash("system", "user") == "caa6945dd8a6e283"
    assert content_hash("x", [1, 2]) == "0dd46a7c94cb30fa" and content_hash("ü") == "25430e7ac849b692"
    assert content_hash("user", "system") != content_hash("system", "user") != content_hash("system", "user", None)
