"""What a notebook's printed readings may contain: numbers its own run computed, nothing typed in.

`reading_lines(executed)` collects the lines a notebook printed as readings: every output line of
the code cells from its "## Reading the figures" heading on, and of any cell that prints a
"Readings" block, leaving out the final metrics dump. `underived_numbers(lines, metrics)` lists the
numbers in those lines that no value of the run's metrics.json accounts for, at the precision
printed: 0.37 matches a metric v with |v - 0.37| <= 0.005, 31% a v within 0.005 of 0.31, 3.8e-25
one within 5% of it, and a whole number a count (or a value that rounds to it). Whole numbers up
to 10 (positions, ranks, reading numbers, K) and the 95 of "95%" are structure, not results.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

# A number standing on its own: not part of a word or a name ("gpt-4-0613", "falcon-40b", "seed_1").
NUMBER = re.compile(r"(?<![\w.\-+/])(?<!\w/)[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.]*[A-Za-z_])|(?<=/)\d+(?:\.\d+)?%?(?![\w])")
STRUCTURAL = {float(i) for i in range(11)} | {95.0}


def reading_lines(executed: str | Path) -> list[str]:
    nb = nbformat.read(str(executed), as_version=4)
    lines, reading_section = [], False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("## Reading the figures"):
            reading_section = True
        if cell.cell_type != "code" or "write_metrics" in cell.source:
            continue
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        if reading_section:
            lines += text.splitlines()
        elif "Readings" in text:
            lines += text[text.index("Readings"):].splitlines()
    return [line for line in lines if line.strip()]


def metric_values(metrics: Mapping[str, Any]) -> list[float]:
    """Every number in metrics.json, however deep in its tables and lists (bools are not numbers)."""
    found: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                found.append(float(value))
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(dict(metrics))
    return found


def _accounts_for(text: str, values: Iterable[float]) -> bool:
    percent = text.endswith("%")
    body = text.rstrip("%")
    x = float(body)
    if not percent and "e" not in body and "." not in body and abs(x) in STRUCTURAL:
        return True
    if percent and x in STRUCTURAL:
        return True
    scale = 100.0 if percent else 1.0
    if "e" in body:
        return any(v != 0 and abs(v * scale - x) <= 0.05 * abs(x) for v in values)
    decimals = len(body.split(".")[1]) if "." in body else 0
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v * scale - x) <= tolerance for v in values)


def underived_numbers(lines: Iterable[str], metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(number, line) for each printed number that no metric accounts for."""
    values = metric_values(metrics)
    return [(m.group(0), line) for line in lines for m in NUMBER.finditer(line)
            if not _accounts_for(m.group(0), values)]
