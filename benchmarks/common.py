"""Shared plumbing of the benchmark scripts: the machine's description, timing, and reporting.

Every benchmark prints a Markdown table and writes the same rows as JSON to
`benchmarks/results/<name>.json` (with the machine they came from), so the README's table can
be refreshed from files rather than copied by hand.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where the figures come from: CPU/GPU, core count, torch version."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["gpu"] = None
    # The CPU matters on both: a figure measured on one CPU does not hold on another (issue 22:
    # the sampler's 2.1x on an Intel Xeon was 1.6x on an AVX2 AMD EPYC), so every result names it.
    info["cpu"] = _cpu_model() or platform.processor() or platform.machine()
    info["cpu_flags"] = _cpu_flags()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()   # the kernels torch dispatches to
    info["blas"] = _blas()
    # OpenMP's wait policy changes small-op CPU timings by up to 2x (benchmarks/rollout.py)
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    try:
        info["load_average_1min"] = os.getloadavg()[0]  # a busy machine makes timings unreliable
    except OSError:
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# The instruction-set extensions that decide which CPU kernels run (MKL/oneDNN pick theirs from them).
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd", "sve")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS if f in present]
    except OSError:
        pass
    return []


def _blas() -> str:
    """The BLAS torch's CPU matrix products go through (MKL, OpenBLAS, ...), from its build config."""
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def machine_label(info: dict | None = None) -> str:
    """One line naming the machine, for a table's caption: 'AMD EPYC [avx2 avx512f avx512_bf16], 2 threads, mkl'."""
    info = info or machine()
    where = info["gpu"] or info["cpu"]
    flags = " ".join(f for f in info.get("cpu_flags", []) if f not in ("fma", "amx_tile"))
    return f"{where} [{flags}], torch {info['torch']}, {info['torch_threads']} threads, {info.get('blas', '?')}"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeat` runs after `warmup` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class TrainingPhases:
    """Where a training run's time goes, measured from outside the trainer, so that two trainers
    sharing no code (ours and TRL's) are split alike: seconds inside the model's forward (its
    outermost module call), inside autograd's backward and inside optimizer steps, and the tokens
    the model read (what its nn.Embedding layers were given, padding included). The rest of the
    run's wall time is collation, gradient clipping, scheduling and the trainer's own bookkeeping.

        with TrainingPhases() as phases:
            train(...)
        phases.forward_s, phases.backward_s, phases.optimizer_s, phases.tokens

    On a CPU every call is synchronous, so the clocks are exact; on a GPU they time the kernel
    launches, not the kernels. Global module hooks cost each module call a few microseconds (both
    trainers alike) and torch.compile would trace them: use it on eager models only, without
    gradient checkpointing (whose recomputed forwards run inside the backward).
    """

    def __enter__(self) -> "TrainingPhases":
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module

        self.forward_s = self.backward_s = self.optimizer_s = 0.0
        self.tokens = 0
        depth, started = [0], [0.0, 0.0]

        def before_forward(module, args):
            if depth[0] == 0:
                started[0] = time.perf_counter()
            depth[0] += 1
            if isinstance(module, torch.nn.Embedding) and args and isinstance(args[0], torch.Tensor):
                self.tokens += args[0].numel()

        def after_forward(module, args, output):
            depth[0] -= 1
            if depth[0] == 0:
                self.forward_s += time.perf_counter() - started[0]

        def before_step(optimizer, args, kwargs):
            started[1] = time.perf_counter()

        def after_step(optimizer, args, kwargs):
            self.optimizer_s += time.perf_counter() - started[1]

        self._handles = [nn_module.register_module_forward_pre_hook(before_forward),
                         nn_module.register_module_forward_hook(after_forward),
                         optim_module.register_optimizer_step_pre_hook(before_step),
                         optim_module.register_optimizer_step_post_hook(after_step)]
        # Tensor.backward calls torch.autograd.backward by name, so wrapping it times every backward.
        self._backward = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self._backward(*args, **kwargs)
            finally:
                self.backward_s += time.perf_counter() - t

        torch.autograd.backward = timed_backward
        return self

    def __exit__(self, *exc) -> None:
        torch.autograd.backward = self._backward
        for handle in self._handles:
            handle.remove()

    def split(self, wall_s: float) -> dict[str, float]:
        """The phases of a run that took `wall_s` seconds, as result-row fields."""
        return {"forward_s": self.forward_s, "backward_s": self.backward_s, "optimizer_s": self.optimizer_s,
                "rest_s": wall_s - self.forward_s - self.backward_s - self.optimizer_s,
                "model_tokens": self.tokens,
                "us_per_token_fwd_bwd": 1e6 * (self.forward_s + self.backward_s) / max(self.tokens, 1)}


def report(name: str, rows: list[dict], notes: str = "") -> Path:
    """Print rows as a Markdown table and save them with the machine to results/<name>.json."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n### {name}\n\n{machine_label()}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    if notes:
        print(f"\n{notes}")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, "notes": notes}, indent=2) + "\n")
    print(f"\n(saved {path})")
    return path
