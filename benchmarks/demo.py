"""Wall time of each notebook of `make demo` (the embedded default) on this machine.

Target (issue 14): all six notebooks on SmolLM2-135M-Instruct in 20 minutes or less on a 2-core
CPU. Runs the demo config through the pipeline into a temporary folder. The model cache
(`$STARLING_CACHE`: the SmolLM2 folder converted from its GGUF, the tiny models) is the user's
("warm" once a demo has run), or with `--fresh-cache` an empty temporary one, as on a first run:
the conversion then counts. CONFIG=papermill_runs/tiny_cpu.yaml times the tiny-model check instead.

    python -m benchmarks.demo                  # warm model cache (results/demo.json)
    python -m benchmarks.demo --fresh-cache    # a first run's time (results/demo_fresh_cache.json)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from starling_lib.pipeline import REPO_ROOT, run_config

TARGET_S = 1200
CONFIG = os.environ.get("CONFIG", "papermill_runs/demo_cpu.yaml")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh-cache", action="store_true",
                        help="run with an empty temporary STARLING_CACHE (a first run: models converted/built again)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh_cache:   # the notebooks' kernels inherit it
            os.environ["STARLING_CACHE"] = str(Path(tmp) / "cache")
        t = time.perf_counter()
        run = run_config(REPO_ROOT / CONFIG, out_dir=Path(tmp) / "run", progress_bar=False)
        total = time.perf_counter() - t
        notebooks = json.loads((run / "summary.json").read_text())["notebooks"]
    rows = [{"notebook": stem, "status": info["status"], "wall s": info.get("wall_s") or 0.0}
            for stem, info in notebooks.items()]
    rows.append({"notebook": "total (with kernel starts)", "status": "", "wall s": total})
    name = "demo" if CONFIG.endswith("demo_cpu.yaml") else "demo_" + Path(CONFIG).stem
    cache = "an empty model cache (first run)" if args.fresh_cache else "the model cache as it was (warm once a demo ran)"
    report(name + ("_fresh_cache" if args.fresh_cache else ""), rows,
           f"{CONFIG}, {cache}; target: {TARGET_S} s for all notebooks; measured {total:.0f} s "
           f"({'meets' if total <= TARGET_S else 'misses'} it)")


if __name__ == "__main__":
    main()
