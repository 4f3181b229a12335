"""Nectar data layer: validation of every malformed-record kind, conversions, chat format."""

import json

import jinja2
import pytest

from starling_lib import data
from starling_lib.data import NectarFormatError, load_nectar


def good_record(k=3):
    return {
        "prompt": "\n\nHuman: Hi there\n\nAssistant: ",
        "answers": [{"answer": f"answer {i}", "model": f"m{i}", "rank": float(i + 1)} for i in range(k)],
        "turns": 1, "num_responses": k, "source": ["sharegpt"], "good_natured": True,
    }


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def broken(mutate):
    rec = good_record()
    mutate(rec)
    return rec


MALFORMED = {
    "bad_prompt": [broken(lambda r: r.pop("prompt")), broken(lambda r: r.update(prompt="   ")),
                   broken(lambda r: r.update(prompt=7))],
    "answers_not_list": [broken(lambda r: r.update(answers="a, b")), broken(lambda r: r.pop("answers"))],
    "too_few_answers": [broken(lambda r: r.update(answers=r["answers"][:1], num_responses=1))],
    "bad_rank": [broken(lambda r: r["answers"][1].pop("rank")),
                 broken(lambda r: r["answers"][1].update(rank="2")),
                 broken(lambda r: r["answers"][1].update(rank=True))],
    "duplicate_ranks": [broken(lambda r: r["answers"][2].update(rank=1.0))],
    "ranks_not_1_to_k": [broken(lambda r: r["answers"][2].update(rank=4.0)),
                         broken(lambda r: [a.update(rank=a["rank"] - 1) for a in r["answers"]])],
    "bad_answer_text": [broken(lambda r: r["answers"][0].pop("answer")),
                        broken(lambda r: r["answers"][0].update(answer=None)),
                        broken(lambda r: r["answers"].__setitem__(0, "just text"))],
    "num_responses_mismatch": [broken(lambda r: r.update(num_responses=7))],
    # wrong turn markers: what prompt_to_messages (and so every trainer) would trip over later
    "bad_turn_markers": [broken(lambda r: r.update(prompt="\n\nUser: Hi there\n\nAssistant: ")),
                         broken(lambda r: r.update(prompt="Human: Hi there\n\nAssistant: ")),
                         broken(lambda r: r.update(prompt="\n\nHuman: Hi there\n\nAI: ")),
                         broken(lambda r: r.update(prompt="\n\nHuman: Hi there")),
                         broken(lambda r: r.update(prompt="\n\nHuman: Hi\n\nAssistant: \n\nAssistant: "))],
    # a lone surrogate (a JSON "\ud800" escape) parses, but Arrow cannot store it
    "bad_unicode": [broken(lambda r: r.update(prompt="\n\nHuman: Hi \ud800\n\nAssistant: ")),
                    broken(lambda r: r["answers"][1].update(answer="broken \udc9f text")),
                    broken(lambda r: r["answers"][0].update(model="m\ud83d"))],
    "bad_source": [broken(lambda r: r.update(source=5)), broken(lambda r: r.update(source=["a", None]))],
}


@pytest.mark.parametrize("reason,rec", [(r, x) for r, xs in MALFORMED.items() for x in xs])
def test_malformed_record_raises_with_index_and_reason(tmp_path, reason, rec):
    path = write_jsonl(tmp_path / "n.jsonl", [good_record(), good_record(), rec, good_record()])
    with pytest.raises(NectarFormatError) as err:
        load_nectar(str(path))
    assert err.value.index == 2 and err.value.line == 3
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{path} line 3 (record index 2): {data.REASONS[reason]}")


def test_invalid_json_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [good_record(), "{not json"])
    with pytest.raises(NectarFormatError, match=r"line 2 \(record index 1\): line is not valid JSON"):
        load_nectar(str(path))


def test_messages_give_one_based_line_numbers_past_blank_lines(tmp_path):
    bad = broken(lambda r: r["answers"][2].update(rank=4.0))
    path = write_jsonl(tmp_path / "n.jsonl", [good_record(), "", "   ", good_record(), bad])
    with pytest.raises(NectarFormatError) as err:
        load_nectar(str(path))
    assert (err.value.line, err.value.index) == (5, 2)       # the 5th line of the file, the 3rd record
    assert f"{path} line 5 (record index 2): ranks are not exactly 1..K" in str(err.value)


def test_wrong_turn_marker_is_caught_at_load_not_in_training(tmp_path):
    fine = broken(lambda r: r.update(prompt="\n\nHuman: Hi\n\nUser: and then?\n\nAssistant:"))  # "User:" is text here
    wrong = broken(lambda r: r.update(prompt="\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: more\n\nGPT: "))
    path = write_jsonl(tmp_path / "n.jsonl", [good_record(), fine, wrong])
    with pytest.raises(NectarFormatError, match="bad_turn_markers|does not start") as err:
        load_nectar(str(path))
    assert err.value.reason == "bad_turn_markers" and (err.value.index, err.value.line) == (2, 3)
    assert "GPT: " in str(err.value) and str(path) in str(err.value)
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = load_nectar(str(path), on_error="skip")
    assert len(data.to_kwise(ds)) == 2                       # everything kept converts for the trainers


def test_lone_surrogate_fails_neither_mode(tmp_path):
    path = tmp_path / "n.jsonl"
    bad = broken(lambda r: r["answers"][1].update(answer="half an emoji \ud83d"))
    write_jsonl(path, [good_record(), good_record(4), json.dumps(bad), good_record(5)])  # json.dumps escapes it
    assert "\\ud83d" in path.read_text()
    with pytest.raises(NectarFormatError) as err:
        load_nectar(str(path))
    assert err.value.reason == "bad_unicode" and (err.value.index, err.value.line) == (2, 3)
    assert "answers[1].answer has a lone surrogate U+D83D" in str(err.value) and str(path) in str(err.value)
    with pytest.warns(UserWarning, match="dropped 1: text is not valid Unicode"):
        ds, report = load_nectar(str(path), on_error="skip", return_report=True)
    assert [r["num_responses"] for r in ds] == [3, 4, 5]      # every good record kept, only the bad one gone
    assert dict(report.dropped) == {"bad_unicode": 1} and report.num_read == 4


def test_bytes_that_are_not_utf8_drop_only_their_line(tmp_path):
    path = tmp_path / "n.jsonl"
    not_utf8 = json.dumps(good_record(4)).encode().replace(b"answer 1", b"answer \xff")
    lines = [json.dumps(good_record()).encode(), not_utf8, json.dumps(good_record(5)).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(NectarFormatError, match=r"line 2 \(record index 1\): text is not valid Unicode.*0xff"):
        load_nectar(str(path))
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = load_nectar(str(path), on_error="skip")
    assert ds["num_responses"] == [3, 5]


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    recs = [good_record(), good_record(4)]
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    as_json = tmp_path / "n.json"
    as_json.write_text("\ufeff" + json.dumps(recs), encoding="utf-8")
    ref = load_nectar(str(write_jsonl(tmp_path / "plain.jsonl", recs))).to_list()
    assert load_nectar(str(jsonl)).to_list() == ref
    assert load_nectar(str(as_json)).to_list() == ref


def test_a_malformed_json_file_is_named(tmp_path):
    path = tmp_path / "n.json"
    path.write_text("[" + json.dumps(good_record()) + ",\n {\"prompt\": ")
    with pytest.raises(ValueError, match=r"n\.json is not valid JSON: .* at line 2, column") as err:
        load_nectar(str(path))
    assert str(path) in str(err.value)
    path.write_bytes(b"[\"\xff\"]")
    with pytest.raises(ValueError, match=r"n\.json is not UTF-8 text: byte 0xff"):
        load_nectar(str(path))


def test_json_records_are_named_by_index(tmp_path):
    path = tmp_path / "n.json"
    path.write_text(json.dumps([good_record(), broken(lambda r: r.update(prompt="\n\nUser: x\n\nAssistant: "))]))
    with pytest.raises(NectarFormatError, match=rf"^{path} record index 1: prompt does not start") as err:
        load_nectar(str(path))
    assert err.value.line is None


def test_skip_drops_and_counts_every_reason(tmp_path):
    bad = [x for xs in MALFORMED.values() for x in xs]
    path = write_jsonl(tmp_path / "n.jsonl", [good_record()] + bad + [good_record(), "[1, 2"])
    with pytest.warns(UserWarning, match="dropped"):
        ds, report = load_nectar(str(path), on_error="skip", return_report=True)
    assert len(ds) == 2 and report.num_kept == 2
    assert report.num_read == 2 + len(bad) + 1
    expected = {reason: len(xs) for reason, xs in MALFORMED.items()}
    expected["invalid_json"] = 1
    assert dict(report.dropped) == expected
    assert "ranks are not exactly 1..K" in str(report)


def test_empty_answer_is_data_not_error(tmp_path):
    rec = good_record()
    rec["answers"][2]["answer"] = ""
    ds, report = load_nectar(str(write_jsonl(tmp_path / "n.jsonl", [rec])), return_report=True)
    assert ds[0]["answers"][2]["answer"] == "" and report.empty_answers == 1


def test_on_error_must_be_known():
    with pytest.raises(ValueError, match="on_error"):
        load_nectar(on_error="ignore")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nectar(str(tmp_path / "missing.jsonl"))


def test_json_and_parquet_sources_match_jsonl(tmp_path):
    recs = [good_record(), good_record(4)]
    (tmp_path / "n.json").write_text(json.dumps(recs))
    ref = load_nectar(str(write_jsonl(tmp_path / "n.jsonl", recs)))
    ref.to_parquet(str(tmp_path / "n.parquet"))
    assert load_nectar(str(tmp_path / "n.json")).to_list() == ref.to_list()
    assert load_nectar(str(tmp_path / "n.parquet")).to_list() == ref.to_list()


def test_optional_fields_are_derived(tmp_path):
    rec = {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: ",
           "answers": [{"answer": "x", "rank": 2}, {"answer": "y", "model": "m", "rank": 1}]}
    row = load_nectar(str(write_jsonl(tmp_path / "n.jsonl", [rec])))[0]
    assert row["turns"] == 2 and row["num_responses"] == 2
    assert row["source"] is None and row["good_natured"] is None
    assert row["answers"][0]["model"] == "unknown" and row["answers"][0]["rank"] == 2.0


# --- the bundled sample ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def nectar():
    ds, report = load_nectar(return_report=True)
    return ds, report


def test_bundled_sample_counts(nectar):
    ds, report = nectar
    assert len(ds) == 397 and report.num_read == 397 and not report.dropped
    assert sum(ds["num_responses"]) == 2779
    assert report.empty_answers == 2
    empties = [a for r in ds for a in r["answers"] if a["answer"] == ""]
    assert {(a["model"], a["rank"]) for a in empties} == {("mistral-7b-instruct-v0.1", 7.0)}
    assert sum(s is not None for s in ds["source"]) == 98


def test_limit(nectar):
    assert len(load_nectar(limit=10)) == 10


def test_pairs_and_kwise(nectar):
    ds, _ = nectar
    pairs = data.to_pairs(ds)
    assert len(pairs) == 397 * 21
    assert all(c < r for c, r in zip(pairs["chosen_rank"], pairs["rejected_rank"]))
    kw = data.to_kwise(ds)
    assert kw[0]["k"] == 7 and len(kw[0]["answers"]) == 7
    first = ds[0]
    best = min(first["answers"], key=lambda a: a["rank"])
    worst = max(first["answers"], key=lambda a: a["rank"])
    assert kw[0]["answers"][0] == best["answer"] and kw[0]["answers"][-1] == worst["answer"]
    assert kw[0]["messages"] == data.prompt_to_messages(first["prompt"])


def test_trl_preference_format(nectar):
    ds, _ = nectar
    trl = data.to_trl_preference(data.to_pairs(ds.select(range(2))))
    assert len(trl) == 42 and set(trl.column_names) == {"prompt", "chosen", "rejected"}
    row = trl[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"


def test_split_is_deterministic_by_prompt(nectar):
    ds, _ = nectar
    a = data.split_by_prompt(ds, 0.2, seed=0)
    b = data.split_by_prompt(ds.shuffle(seed=1), 0.2, seed=0)
    assert set(a["test"]["prompt"]) == set(b["test"]["prompt"])
    assert not set(a["test"]["prompt"]) & set(a["train"]["prompt"])
    assert 0.1 < len(a["test"]) / len(ds) < 0.3
    assert set(data.split_by_prompt(ds, 0.2, seed=1)["test"]["prompt"]) != set(a["test"]["prompt"])
    # pairs of one prompt never straddle the split
    pairs = data.split_by_prompt(data.to_pairs(ds.select(range(20))), 0.5, seed=0)
    assert not set(pairs["train"]["prompt"]) & set(pairs["test"]["prompt"])


def test_prompt_to_messages_multi_turn():
    prompt = "\n\nHuman: Hello\n\nAssistant: Hi!  How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: "
    assert data.prompt_to_messages(prompt) == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!  How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    with pytest.raises(ValueError, match="does not start"):
        data.prompt_to_messages("Hello\n\nAssistant: ")


def test_bundled_turns_agree_with_messages(nectar):
    ds, _ = nectar
    for rec in ds:
        msgs = data.prompt_to_messages(rec["prompt"])
        assert sum(m["role"] == "user" for m in msgs) == rec["turns"]


# --- chat format ---------------------------------------------------------------------------

CARD = {  # the Starling-LM-7B-alpha model card's examples
    "single": ([{"role": "user", "content": "Hello"}],
               "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"),
    "multi": ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
               {"role": "user", "content": "How are you today?"}],
              "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi<|end_of_turn|>"
              "GPT4 Correct User: How are you today?<|end_of_turn|>GPT4 Correct Assistant:"),
}
CODE = ([{"role": "user", "content": "Implement quicksort using C++"}],
        "Code User: Implement quicksort using C++<|end_of_turn|>Code Assistant:")


def render(template, messages, **kw):
    return jinja2.Environment().from_string(template).render(
        messages=messages, bos_token="<s>", add_generation_prompt=True, **kw)


@pytest.mark.parametrize("case", sorted(CARD))
def test_chat_format_matches_model_card(case):
    messages, expected = CARD[case]
    assert data.format_chat(messages) == "<s>" + expected
    assert render(data.OPENCHAT_TEMPLATE, messages) == "<s>" + expected


def test_project_template_equals_shipped_template():
    shipped = data.bundled_path("openchat_3.5_chat_template.jinja").read_text().strip()
    for messages, _ in CARD.values():
        assert render(data.OPENCHAT_TEMPLATE, messages) == render(shipped, messages)


def test_coding_mode():
    messages, expected = CODE
    assert data.format_chat(messages, mode="code") == "<s>" + expected
    assert render(data.OPENCHAT_TEMPLATE, messages, mode="code") == "<s>" + expected
    with pytest.raises(ValueError, match="mode"):
        data.format_chat(messages, mode="chatml")
