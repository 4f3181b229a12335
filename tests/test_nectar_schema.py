"""Nectar's schema: the dataset card's declaration (data.NECTAR_CARD_SCHEMA, berkeley-nest/Nectar's
README.md at 3c6b4c4) against the Dataset the loader builds (NECTAR_FEATURES), the bundled sample, and
records written in the card's own schema. Every way they differ must be one of the differences
data.NECTAR_CARD_DIFFERENCES states and the loader handles, so that the sample, the loader and the hub
data set cannot drift apart silently: a new field, a renamed one or a changed type fails here.
"""

import json

import pandas as pd
import pytest
from hub_caches import NECTAR_CARD, hf_cache, put_hf  # noqa: F401  (hf_cache: a fixture)

from starling_lib import data
from starling_lib.data import (NECTAR_CARD_DIFFERENCES, NECTAR_CARD_RENAMES, NECTAR_CARD_SCHEMA, NECTAR_FEATURES,
                               NectarFormatError, bundled_path, load_nectar)

ARROW = {str: "string", int: "int64", bool: "bool"}   # the card's types as the Arrow types that hold them


def card_paths(schema=NECTAR_CARD_SCHEMA, prefix=""):
    """{"prompt": str, "answers[].rank": int, "source": [str], ...}: the card's fields, nested ones flattened."""
    out = {}
    for name, kind in schema.items():
        if isinstance(kind, list) and isinstance(kind[0], dict):
            out.update(card_paths(kind[0], f"{prefix}{name}[]."))
        else:
            out[prefix + name] = kind
    return out


def feature_paths(features=None, prefix=""):
    """The same flattening of NECTAR_FEATURES: path -> "string" / "int64" / ["string"] / ..."""
    from datasets import List, Value

    out = {}
    for name, feature in (features if features is not None else NECTAR_FEATURES()).items():
        if isinstance(feature, List) and isinstance(feature.feature, dict):
            out.update(feature_paths(feature.feature, f"{prefix}{name}[]."))
        elif isinstance(feature, List):
            out[prefix + name] = [feature.feature.dtype]
        else:
            assert isinstance(feature, Value), (name, feature)
            out[prefix + name] = feature.dtype
    return out


def test_the_card_schema_is_the_card_s():
    """The constant is what the card says, field for field (the card's own words in the comments)."""
    assert data.NECTAR_CARD_SOURCE.endswith("berkeley-nest/Nectar/blob/3c6b4c47fa1cc38869f9f32dce1699f7abad8b06/README.md")
    assert card_paths() == {
        "prompt": str,               # prompt: str, // in format "\n\nHuman: ... \n\nAssistant: "
        "answers[].answer": str,     # answer: str, // the model's response
        "answers[].model": str,      # model: str, // name of the model that generated the response
        "answers[].rank": int,       # rank: int // the rank this response recieved
        "turns": int,                # turns: int, // number of turns in the conversation
        "num_response": int,         # num_response: int, // number of responses for the prompt
        "source": [str],             # source: list[str], // list of the dataset sources for the prompt and answers
        "good_natured": bool,        # good_natured: bool // if the prompt is good natured
    }


def test_the_dataset_features_differ_from_the_card_only_as_stated():
    card = {NECTAR_CARD_RENAMES.get(path, path): kind for path, kind in card_paths().items()}
    features = feature_paths()
    assert set(features) == set(card), "NECTAR_FEATURES and the card name different fields (beyond NECTAR_CARD_RENAMES)"
    type_differences = {path for path, kind in card.items()
                        if features[path] != ([ARROW[kind[0]]] if isinstance(kind, list) else ARROW[kind])}
    assert type_differences == {"answers[].rank"} and features["answers[].rank"] == "float64"
    renamed = set(NECTAR_CARD_RENAMES)
    assert renamed == {"num_response"}
    assert renamed | type_differences <= set(NECTAR_CARD_DIFFERENCES)


def sample_records():
    rows = [json.loads(line) for line in bundled_path("nectar_sample.jsonl").read_text().splitlines()]
    for r in rows:
        assert isinstance(r.pop("_provenance"), dict)   # the sample's own bookkeeping, not Nectar's
    return rows


def differences_from_the_card(rec: dict) -> set[str]:
    """The ways one record departs from the card's schema, named as in NECTAR_CARD_DIFFERENCES;
    anything else (a missing, extra or mistyped field) fails the calling test."""
    renamed = {NECTAR_CARD_RENAMES.get(name, name) for name in NECTAR_CARD_SCHEMA}
    assert set(rec) in (set(NECTAR_CARD_SCHEMA), renamed), f"fields {sorted(rec)}"
    found = set(NECTAR_CARD_RENAMES) if set(rec) == renamed else set()
    rec = {NECTAR_CARD_RENAMES.get(name, name): value for name, value in rec.items()}
    for name, kind in NECTAR_CARD_SCHEMA.items():
        value = rec[NECTAR_CARD_RENAMES.get(name, name)]
        if name == "answers":
            assert isinstance(value, list)
            for answer in value:
                assert set(answer) == set(kind[0]), f"answer fields {sorted(answer)}"
                for field, field_kind in kind[0].items():
                    if field == "rank" and isinstance(answer["rank"], float):
                        assert answer["rank"].is_integer(), answer["rank"]
                        found.add("answers[].rank")
                    else:
                        assert type(answer[field]) is field_kind, (field, answer[field])
        elif name == "source" and value is None:
            found.add("source")
        elif isinstance(kind, list):
            assert isinstance(value, list) and all(type(x) is kind[0] for x in value), (name, value)
        else:
            assert type(value) is kind, (name, value)
    return found


def test_the_bundled_sample_agrees_with_the_card_but_for_the_stated_differences():
    rows = sample_records()
    found = set().union(*(differences_from_the_card(r) for r in rows))
    assert found == set(NECTAR_CARD_DIFFERENCES)   # each stated difference is real, and there are no others
    assert sum(r["source"] is None for r in rows) == 299


def card_record(k=3, **changes):
    """A record written exactly in the card's schema: int ranks, num_response."""
    rec = {"prompt": "\n\nHuman: Hi there\n\nAssistant: ",
           "answers": [{"answer": f"answer {i}", "model": f"m{i}", "rank": i + 1} for i in range(k)],
           "turns": 1, "num_response": k, "source": ["sharegpt"], "good_natured": True}
    rec.update(changes)
    assert differences_from_the_card(rec) == set()
    return rec


def test_records_in_the_card_schema_load_as_the_sample_s_do(tmp_path):
    card = [card_record(), card_record(4, good_natured=False, source=["lmsys-chat-1m", "ultrafeedback"])]
    sample_like = [{**{k: v for k, v in r.items() if k != "num_response"}, "num_responses": r["num_response"],
                    "answers": [{**a, "rank": float(a["rank"])} for a in r["answers"]]} for r in card]
    reference = load_nectar(str(_jsonl(tmp_path / "sample_like.jsonl", sample_like))).to_list()
    assert load_nectar(str(_jsonl(tmp_path / "card.jsonl", card))).to_list() == reference
    pd.DataFrame(card).to_parquet(tmp_path / "card.parquet")   # int64 ranks, as the card declares them
    assert load_nectar(str(tmp_path / "card.parquet")).to_list() == reference
    assert reference[1]["num_responses"] == 4 and reference[1]["answers"][3]["rank"] == 4.0


def test_the_hub_data_set_in_the_card_schema_loads_by_hub_id(hf_cache, tmp_path):
    """The same through the hub path (datasets reads the parquet, int64 ranks and all, from the cached snapshot)."""
    card = [card_record(), card_record(5)]
    pd.DataFrame(card).to_parquet(tmp_path / "rlaif.parquet")
    put_hf(hf_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "rlaif.parquet"},
           "dataset")
    ds = load_nectar("berkeley-nest/Nectar")
    assert ds.features == NECTAR_FEATURES()
    assert ds["num_responses"] == [3, 5] and [a["rank"] for a in ds[1]["answers"]] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_the_card_s_num_response_is_checked_not_dropped(tmp_path):
    with pytest.raises(NectarFormatError, match=r"num_responses \(or the card's num_response\) disagrees.*"
                                                r"num_response=7, answers=3"):
        load_nectar(str(_jsonl(tmp_path / "n.jsonl", [card_record(num_response=7)])))
    both = {**card_record(), "num_responses": 3, "num_response": 2}
    with pytest.raises(NectarFormatError, match=r"num_response=2, answers=3"):
        load_nectar(str(_jsonl(tmp_path / "both.jsonl", [both])))


def test_a_rank_that_is_not_integral_is_refused_whatever_the_type(tmp_path):
    rec = card_record()
    rec["answers"][2]["rank"] = 2.5
    with pytest.raises(NectarFormatError, match="ranks are not exactly 1..K"):
        load_nectar(str(_jsonl(tmp_path / "n.jsonl", [rec])))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
