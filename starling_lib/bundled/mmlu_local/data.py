"""The bundled MMLU-format questions for lm-eval's `custom_dataset` (see _default_template_yaml)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_subject(subject: str, **_metadata) -> datasets.DatasetDict:
    """{"test", "dev"} splits of one subject, in file order, with cais/mmlu's columns
    (question, subject, choices, answer)."""
    splits = {}
    for split in ("test", "dev"):
        with open(HERE / f"{split}.jsonl", encoding="utf-8") as f:
            rows = [row for row in map(json.loads, filter(str.strip, f)) if row["subject"] == subject]
        if not rows:
            raise ValueError(f"no {split} questions for subject {subject!r} in {HERE / f'{split}.jsonl'}")
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
