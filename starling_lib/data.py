"""Nectar data layer and the OpenChat-3.5 / Starling chat format.

Nectar (berkeley-nest/Nectar) holds about 183K chat prompts, each with 7 answers from different
models ranked 1 (best) to 7 by GPT-4. A record:

    prompt:        str, "\\n\\nHuman: ...\\n\\nAssistant: " repeated per turn, ending with an open
                   "Assistant:"
    answers:       list of {answer: str, model: str, rank: float} (the card says int; integral either way)
    turns:         int, number of human turns
    num_responses: int, len(answers) (the dataset card calls it num_response; see NECTAR_CARD_DIFFERENCES)
    source:        list[str] or None, the prompt datasets the prompt came from
    good_natured:  bool or None, GPT-4's flag that the conversation is not harmful

`load_nectar` reads the bundled sample, the hub dataset or a local file and validates every record:
besides the fields above, the prompt's turn markers (it must start with "\\n\\nHuman:" and end with
an open "\\n\\nAssistant:", which is what `prompt_to_messages` and the trainers read) and its text
(valid UTF-8, no lone surrogate such as a JSON "\\ud800" escape, which Arrow cannot store). An error
names the file, the record's 0-based index and, in a .jsonl, its 1-based line number; a malformed
.json file is named too. A UTF-8 byte-order mark at the start of a .jsonl or .json file is read as
such, not as an error.

The conversions turn records into what the trainers eat: chat messages, K-wise lists ordered best
to worst, all (chosen, rejected) pairs, TRL's conversational preference format, and a
deterministic split by prompt.

Departures from the released data: the bundled sample (397 records) was rebuilt from the Starling
authors' rating experiments, so its labels may differ from the released parquet; `_provenance`
and other extra columns are not carried into the Dataset (see bundled/PROVENANCE.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
NECTAR_HUB_ID = "berkeley-nest/Nectar"

END_OF_TURN = "<|end_of_turn|>"
BOS_TOKEN = "<s>"

# The OpenChat-3.5 template shipped with Starling-LM-7B-alpha (bundled/openchat_3.5_chat_template.jinja),
# extended with the model card's coding mode: `apply_chat_template(..., mode="code")` renders
# "Code User: ...<|end_of_turn|>Code Assistant:". Without `mode` it renders exactly as the original.
OPENCHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if mode is defined and mode == 'code' %}{% set prefix = 'Code ' %}{% else %}{% set prefix = 'GPT4 Correct ' %}{% endif %}"
    "{% for message in messages %}"
    "{{ prefix + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ prefix + 'Assistant:' }}{% endif %}"
)
CHAT_MODES = {"gpt4": "GPT4 Correct ", "code": "Code "}


def bundled_path(*parts: str) -> Path:
    """Path of a file shipped in `starling_lib/bundled/` (see PROVENANCE.md there)."""
    path = BUNDLED_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"no bundled file {path.relative_to(BUNDLED_DIR)} in {BUNDLED_DIR}")
    return path


# ----------------------------------------------------------------------------------------------
# Validation

# Every way a record can be malformed, with the words used in errors and reports.
REASONS = {
    "invalid_json": "line is not valid JSON or not an object",
    "bad_unicode": "text is not valid Unicode (bytes that are not UTF-8, or a lone surrogate)",
    "bad_prompt": "prompt missing, not a string, or empty",
    "bad_turn_markers": "prompt does not start with '\\n\\nHuman:' and end with an open '\\n\\nAssistant:'",
    "answers_not_list": "answers missing or not a list",
    "too_few_answers": "fewer than 2 answers",
    "bad_answer_text": "answer text missing or not a string",
    "bad_rank": "rank missing or not a number",
    "duplicate_ranks": "two answers share a rank",
    "ranks_not_1_to_k": "ranks are not exactly 1..K",
    "num_responses_mismatch": "num_responses (or the card's num_response) disagrees with the number of answers",
    "bad_source": "source is not a string or a list of strings",
}


class NectarFormatError(ValueError):
    """A malformed Nectar record: `.index` is its 0-based position among the source's records,
    `.line` its 1-based line number in a .jsonl file (else None), `.reason` a REASONS key."""

    def __init__(self, index: int, reason: str, detail: str, where: str = "", line: int | None = None):
        self.index, self.reason, self.detail, self.line = index, reason, detail, line
        loc = f"{where} " if where else ""
        at = f"line {line} (record index {index})" if line is not None else f"record index {index}"
        super().__init__(f"{loc}{at}: {REASONS[reason]} ({detail})")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_OPEN_ASSISTANT = re.compile(r"\n\nAssistant:\s*\Z")


def _lone_surrogate(text: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_text(index: int, name: str, text: str) -> None:
    pos = _lone_surrogate(text)
    if pos is not None:
        raise NectarFormatError(index, "bad_unicode", f"{name} has a lone surrogate U+{ord(text[pos]):04X} "
                                                      f"at character {pos}")


def check_record(rec: Any, index: int) -> None:
    """Raise NectarFormatError if `rec` is not a well-formed Nectar record.

    Empty answer strings are allowed: Nectar has real ones (they are ranked last). The prompt's
    turns need not alternate (the bundled sample has two human turns in a row once), but it must
    open with a human turn and end with the open assistant turn the answers fill.
    """
    if not isinstance(rec, dict):
        raise NectarFormatError(index, "invalid_json", f"got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise NectarFormatError(index, "bad_prompt", f"prompt={prompt!r:.60}")
    _check_text(index, "prompt", prompt)
    if not prompt.startswith("\n\nHuman:"):
        raise NectarFormatError(index, "bad_turn_markers", f"prompt starts with {prompt[:30]!r}")
    if not _OPEN_ASSISTANT.search(prompt):
        raise NectarFormatError(index, "bad_turn_markers", f"prompt ends with {prompt[-30:]!r}")
    try:
        prompt_to_messages(prompt)
    except ValueError as e:
        raise NectarFormatError(index, "bad_turn_markers", str(e)) from None
    answers = rec.get("answers")
    if not isinstance(answers, list):
        raise NectarFormatError(index, "answers_not_list", f"answers is {type(answers).__name__}")
    if len(answers) < 2:
        raise NectarFormatError(index, "too_few_answers", f"{len(answers)} answer(s)")
    for j, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            got = type(a.get("answer")).__name__ if isinstance(a, dict) else type(a).__name__
            raise NectarFormatError(index, "bad_answer_text", f"answers[{j}] text is {got}")
        if not _is_number(a.get("rank")):
            raise NectarFormatError(index, "bad_rank", f"answers[{j}] rank={a.get('rank')!r}")
        _check_text(index, f"answers[{j}].answer", a["answer"])
        if isinstance(a.get("model"), str):
            _check_text(index, f"answers[{j}].model", a["model"])
    ranks = [a["rank"] for a in answers]
    dup = [r for r, n in Counter(ranks).items() if n > 1]
    if dup:
        raise NectarFormatError(index, "duplicate_ranks", f"rank {dup[0]:g} appears more than once in {ranks}")
    k = len(answers)
    if sorted(ranks) != list(range(1, k + 1)):
        raise NectarFormatError(index, "ranks_not_1_to_k", f"ranks {sorted(ranks)} for K={k}")
    for name in ("num_responses", "num_response"):   # the released parquet's name, the card's (NECTAR_CARD_DIFFERENCES)
        n = rec.get(name)
        if n is not None and n != k:
            raise NectarFormatError(index, "num_responses_mismatch", f"{name}={n!r}, answers={k}")
    source = rec.get("source")
    if source is not None and not isinstance(source, str):
        if not isinstance(source, list) or not all(isinstance(x, str) for x in source):
            raise NectarFormatError(index, "bad_source", f"source={source!r:.60}")
    for j, x in enumerate([source] if isinstance(source, str) else source or []):
        _check_text(index, f"source[{j}]", x)


def _normalise(rec: dict) -> dict:
    """The Nectar schema only, with optional fields filled in from the record itself."""
    source = rec.get("source")
    if isinstance(source, str):
        source = [source]
    return {
        "prompt": rec["prompt"],
        "answers": [{"answer": a["answer"], "model": str(a.get("model") or "unknown"), "rank": float(a["rank"])}
                    for a in rec["answers"]],
        "turns": int(rec["turns"]) if _is_number(rec.get("turns")) else rec["prompt"].count("\n\nHuman:"),
        "num_responses": len(rec["answers"]),
        "source": list(source) if source else None,
        "good_natured": rec.get("good_natured") if isinstance(rec.get("good_natured"), bool) else None,
    }


@dataclass
class LoadReport:
    """What `load_nectar` read, kept and dropped (and why)."""

    source: str
    num_read: int = 0
    num_kept: int = 0
    dropped: Counter = field(default_factory=Counter)   # REASONS key -> count
    examples: list = field(default_factory=list)       # first few error messages, for the user
    empty_answers: int = 0                              # empty answer strings kept (real data)

    def __str__(self) -> str:
        lines = [f"Nectar from {self.source}: read {self.num_read} records, kept {self.num_kept}; "
                 f"{self.empty_answers} empty answer string(s) kept as data."]
        for reason, n in self.dropped.most_common():
            lines.append(f"  dropped {n}: {REASONS[reason]}")
        lines += [f"    e.g. {msg}" for msg in self.examples]
        return "\n".join(lines)


def _read_records(source: str) -> tuple[Iterable[tuple[int, int | None, Any]], str]:
    """(index, 1-based line number or None, raw record) triples from the bundled sample, a local
    file or the hub, and the name of where they come from."""
    if source == "bundled":
        path = bundled_path("nectar_sample.jsonl")
    elif Path(source).exists():
        path = Path(source)
    elif Path(source).suffix in {".jsonl", ".json", ".parquet"}:
        raise FileNotFoundError(f"Nectar file {source!r} does not exist")
    else:  # a hub id, e.g. berkeley-nest/Nectar or berkeley-nest/Nectar@<revision> (see starling_lib/hub.py)
        import datasets

        from starling_lib import hub
        if hub.parse(source) is None:
            raise FileNotFoundError(f"Nectar source {source!r} is neither 'bundled', an existing file nor a hub id "
                                    f"(org/name or org/name@revision; modelscope:org/name for ModelScope)")
        folder = hub.snapshot(source, "dataset")
        ds = datasets.load_dataset(str(folder), split="train")   # the splits the data set's card declares
        return ((i, None, rec) for i, rec in enumerate(ds)), f"hub:{source}"

    if path.suffix == ".parquet":
        import pandas as pd
        try:
            rows = pd.read_parquet(path).to_dict(orient="records")
        except Exception as e:  # pyarrow's errors do not always name the file
            raise ValueError(f"Nectar file {path} could not be read as parquet: {e}") from e
        # parquet gives numpy arrays for list columns
        rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in rows]
        return ((i, None, rec) for i, rec in enumerate(rows)), str(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))  # utf-8-sig: a leading BOM is not an error
        except UnicodeDecodeError as e:
            raise ValueError(f"Nectar file {path} is not UTF-8 text: byte {e.object[e.start]:#04x} "
                             f"at offset {e.start}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"Nectar file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                             f"column {e.colno}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return ((i, None, rec) for i, rec in enumerate(data)), str(path)

    def jsonl():
        # Bytes, decoded line by line: a line that is not UTF-8 is that record's error, not the file's.
        index = 0
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is not an error
                except UnicodeDecodeError as e:
                    yield index, line_no, _BadRecord("bad_unicode", f"byte {raw[e.start]:#04x} at column "
                                                                    f"{e.start + 1} is not UTF-8")
                    index += 1
                    continue
                if not line.strip():
                    continue
                try:
                    yield index, line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    yield index, line_no, _BadRecord("invalid_json", f"{e.msg} at column {e.colno}")
                index += 1
    return jsonl(), str(path)


@dataclass
class _BadRecord:
    """A record that could not even be read: the REASONS key and what was wrong."""

    reason: str
    detail: str


def load_nectar(source: str = "bundled", on_error: str = "raise", limit: int | None = None,
                return_report: bool = False):
    """Load Nectar as a `datasets.Dataset`, validating every record.

    source:   "bundled" (the 397-record sample shipped with the package), a hub id such as
              "berkeley-nest/Nectar", optionally at a revision ("berkeley-nest/Nectar@<commit>";
              fetched by `hub.snapshot`, then read by `datasets.load_dataset` from the local
              folder, so a cached copy serves HF_HUB_OFFLINE=1), a ModelScope id behind
              "modelscope:" (the same, through ModelScope's cache; MODELSCOPE_OFFLINE=1), or a
              local .jsonl / .json / .parquet path.
    on_error: "raise" stops at the first malformed record with an error naming the file, the
              record's 0-based index (and its 1-based line in a .jsonl) and the problem; "skip"
              drops malformed records (and only them), counts them per reason and warns with
              that count. Nothing is dropped silently.
    limit:    keep at most this many valid records (None: all), for quick runs.
    return_report: also return the LoadReport.
    """
    if on_error not in {"raise", "skip"}:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    import datasets

    records, where = _read_records(source)
    report = LoadReport(source=where)
    kept = []
    for index, line, rec in records:
        if limit is not None and len(kept) >= limit:
            break
        report.num_read += 1
        try:
            if isinstance(rec, _BadRecord):
                raise NectarFormatError(index, rec.reason, rec.detail)
            check_record(rec, index)
        except NectarFormatError as e:
            e = NectarFormatError(e.index, e.reason, e.detail, where=where, line=line)
            if on_error == "raise":
                raise e from None
            report.dropped[e.reason] += 1
            if len(report.examples) < 5:
                report.examples.append(str(e))
            continue
        row = _normalise(rec)
        report.empty_answers += sum(a["answer"] == "" for a in row["answers"])
        kept.append(row)
    report.num_kept = len(kept)
    if report.dropped:
        warnings.warn(str(report), stacklevel=2)
    if not kept:
        raise ValueError(f"no valid Nectar records in {where}\n{report}")
    ds = datasets.Dataset.from_list(kept, features=NECTAR_FEATURES())
    return (ds, report) if return_report else ds


# The schema berkeley-nest/Nectar's dataset card declares ("Schema:" in its README.md at commit 3c6b4c4),
# field for field, its types written as Python types ([x]: a list of x).
NECTAR_CARD_SOURCE = ("https://huggingface.co/datasets/berkeley-nest/Nectar/blob/"
                      "3c6b4c47fa1cc38869f9f32dce1699f7abad8b06/README.md")
NECTAR_CARD_SCHEMA = {
    "prompt": str,
    "answers": [{"answer": str, "model": str, "rank": int}],
    "turns": int,
    "num_response": int,
    "source": [str],
    "good_natured": bool,
}
# The card's name -> the column's name in the released parquet, the bundled sample and NECTAR_FEATURES.
NECTAR_CARD_RENAMES = {"num_response": "num_responses"}
# Where the card and the data differ, and how the loader handles each (tests/test_nectar_schema.py
# checks that these are all the differences there are). The released parquet's own schema is the
# sample's, not the card's: rank float64, num_responses int64, as `datasets` recorded it preparing
# berkeley-nest/Nectar@4879f7a:data/rlaif.parquet (huggingface.co/datasets/evanfrick/random_pre,
# train/dataset_info.json, a Nectar author's repository).
NECTAR_CARD_DIFFERENCES = {
    "num_response": "the card's name for the answer count; the parquet's column, the sample's and the "
                    "Dataset's is num_responses. A record may carry either (or both): each is checked "
                    "against len(answers) (num_responses_mismatch), and the Dataset has num_responses",
    "answers[].rank": "the card says int; the parquet and the sample store floats with integral values "
                      "(1.0 ... 7.0). Either is accepted when the ranks are exactly 1..K; the Dataset "
                      "stores float64",
    "source": "the card says list[str]; the sample has null where a prompt's source is unknown (299 of "
              "397 records). A record may carry a list, one string (kept as a one-element list) or null",
}


def NECTAR_FEATURES():
    """The Arrow schema of a Nectar Dataset (a function so importing this module stays light)."""
    from datasets import Features, List, Value
    return Features({
        "prompt": Value("string"),
        "answers": List({"answer": Value("string"), "model": Value("string"), "rank": Value("float64")}),
        "turns": Value("int64"),
        "num_responses": Value("int64"),
        "source": List(Value("string")),
        "good_natured": Value("bool"),
    })


# ----------------------------------------------------------------------------------------------
# Conversions

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: " -> user/assistant/user messages.

    The final open "Assistant:" is the slot the answers fill, so it is not a message.
    """
    parts = _TURN.split(prompt)
    if parts[0].strip():
        raise ValueError(f"prompt does not start with '\\n\\nHuman:': {prompt[:60]!r}")
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"prompt does not end with a human turn and an open 'Assistant:': {prompt[-60:]!r}")
    return messages


def ranked(record: dict) -> list[dict]:
    """The record's answers ordered best (rank 1) to worst."""
    return sorted(record["answers"], key=lambda a: a["rank"])


def to_kwise(ds):
    """One row per prompt: `messages`, `answers` (texts best to worst), `models`, `k`.

    This is the input of the K-wise Plackett-Luce reward-model loss.
    """
    def convert(rec):
        best_first = ranked(rec)
        return {"messages": prompt_to_messages(rec["prompt"]),
                "answers": [a["answer"] for a in best_first],
                "models": [a["model"] for a in best_first],
                "k": len(best_first)}
    return ds.map(convert, remove_columns=[c for c in ds.column_names if c != "prompt"])


def to_pairs(ds):
    """Every (chosen, rejected) pair of each ranking: K(K-1)/2 rows per prompt (21 for K = 7)."""
    rows = []
    for rec in ds:
        best_first = ranked(rec)
        for i, hi in enumerate(best_first):
            for lo in best_first[i + 1:]:
                rows.append({"prompt": rec["prompt"], "chosen": hi["answer"], "rejected": lo["answer"],
                             "chosen_model": hi["model"], "rejected_model": lo["model"],
                             "chosen_rank": hi["rank"], "rejected_rank": lo["rank"]})
    import datasets
    return datasets.Dataset.from_list(rows)


def to_trl_preference(pairs):
    """TRL's conversational preference format from `to_pairs` output.

    prompt: list of messages; chosen / rejected: one assistant message each.
    """
    return pairs.map(lambda r: {
        "prompt": prompt_to_messages(r["prompt"]),
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }, remove_columns=pairs.column_names)


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_by_prompt(ds, test_fraction: float = 0.1, seed: int = 0):
    """Deterministic train/test split by prompt text: a `datasets.DatasetDict`.

    A prompt's bucket comes from a hash of (seed, prompt), so the split does not depend on row
    order, and every row of one prompt (its K-wise list or its 21 pairs) lands on the same side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    import datasets

    def is_test(prompt) -> bool:
        digest = hashlib.sha256(f"{seed}\x00{_prompt_key(prompt)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction

    flags = [is_test(p) for p in ds["prompt"]]
    test_idx = [i for i, f in enumerate(flags) if f]
    train_idx = [i for i, f in enumerate(flags) if not f]
    return datasets.DatasetDict({"train": ds.select(train_idx), "test": ds.select(test_idx)})


# ----------------------------------------------------------------------------------------------
# Chat format

def format_chat(messages: Sequence[dict], add_generation_prompt: bool = True, mode: str = "gpt4",
                bos: str = BOS_TOKEN) -> str:
    """Render messages in the OpenChat-3.5 / Starling format, exactly as OPENCHAT_TEMPLATE does.

    >>> format_chat([{"role": "user", "content": "Hello"}])
    '<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:'
    """
    if mode not in CHAT_MODES:
        raise ValueError(f"mode must be one of {sorted(CHAT_MODES)}, got {mode!r}")
    prefix = CHAT_MODES[mode]
    text = bos + "".join(f"{prefix}{m['role'].title()}: {m['content']}{END_OF_TURN}" for m in messages)
    return text + (f"{prefix}Assistant:" if add_generation_prompt else "")
