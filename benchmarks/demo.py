"""Wall time of each notebook of `make demo` (the embedded default) on this machine.

Target (issue 14): all five notebooks on SmolLM2-135M-Instruct in 20 minutes or less on a 2-core
CPU. Runs the demo config through the pipeline into a temporary folder (the converted SmolLM2
folder comes from the cache if it is there: run once with an empty STARLING_CACHE for a first-run
figure). CONFIG=papermill_runs/tiny_cpu.yaml times the tiny-model check instead.

    python -m benchmarks.demo
    STARLING_CACHE=$(mktemp -d) python -m benchmarks.demo      # fresh cache
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from starling_lib.pipeline import REPO_ROOT, run_config

TARGET_S = 1200
CONFIG = os.environ.get("CONFIG", "papermill_runs/demo_cpu.yaml")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = run_config(REPO_ROOT / CONFIG, out_dir=Path(tmp) / "run", progress_bar=False)
        total = time.perf_counter() - t
        notebooks = json.loads((run / "summary.json").read_text())["notebooks"]
    rows = [{"notebook": stem, "status": info["status"], "wall s": info.get("wall_s") or 0.0}
            for stem, info in notebooks.items()]
    rows.append({"notebook": "total (with kernel starts)", "status": "", "wall s": total})
    report("demo" if CONFIG.endswith("demo_cpu.yaml") else "demo_" + Path(CONFIG).stem, rows, f"target: {TARGET_S} s for all notebooks; measured {total:.0f} s "
                         f"({'meets' if total <= TARGET_S else 'misses'} it)")


if __name__ == "__main__":
    main()
