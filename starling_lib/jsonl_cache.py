"""The resumable caches of the evaluations: an append-only JSONL file, and `content_hash`.

The ranking judge (judge.rate_dataset), MT-Bench (answers and judgments) and AlpacaEval
(preferences) keep what they paid for in a `JsonlCache`, so an interrupted run resumes without
asking again. Each record is one JSON line, keyed by some of its fields; the last record of a key
wins. Every record is flushed and fsynced as it is written, so an interruption loses at most the
record being written. Reading skips a line that is not a JSON object holding the key fields (such
as the torn last line of an interrupted write), warns, and counts it in `num_bad_lines`; its
record is simply made again. Records hold only what the caller puts in them: never credentials.

`content_hash(*parts)` is the short fingerprint the caches compare to tell whether a cached record
is still valid (the judge prompt, the generation settings, the weights it was made from).

This module imports nothing else from starling_lib.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence


def content_hash(*parts) -> str:
    """16 hex digits of the SHA-256 of `parts` as JSON: equal parts, equal hash."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


class JsonlCache:
    """Append-only JSONL records keyed by the tuple of their `key_fields`; safe to interrupt."""

    def __init__(self, path: str | os.PathLike, key_fields: Sequence[str]):
        self.path, self.key_fields = Path(path), tuple(key_fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[tuple, dict] = {}
        self.num_bad_lines = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_text(encoding="utf-8")
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self._rows[self.key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                self.num_bad_lines += 1
        if self.num_bad_lines:
            warnings.warn(f"{self.path}: skipped {self.num_bad_lines} unreadable line(s) (an interrupted write?); "
                          f"their records will be made again", stacklevel=3)
        if raw and not raw.endswith("\n"):  # so the next record does not glue onto a torn line
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")

    def key(self, row: Mapping) -> tuple:
        """The key of a record: its values of the key fields."""
        return tuple(row[f] for f in self.key_fields)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, *key) -> dict | None:
        """The last record with this key (one value per key field), or None."""
        return self._rows.get(tuple(key))

    def put(self, row: Mapping) -> None:
        """Append `row` to the file (flushed and fsynced) and make it its key's record."""
        row = dict(row)
        key = self.key(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._rows[key] = row
