"""Reward-model epoch: the project's K-wise trainer against TRL's RewardTrainer on all 21 pairs.

One epoch over the bundled Nectar training prompts, same backbone (the tiny 4-layer 256-wide
Mistral), same head initialisation, same chat format and truncation (`max_length` tokens), same
optimizer, learning rate and steps (an optimizer step takes `batch_size` rankings: their K answers
for the K-wise trainer, their K(K-1)/2 pairs for TRL), then held-out pairwise accuracy on every
test prompt. Four runs:

    kwise-padded   starling_lib.rm_train, each prompt + answer padded to the micro-batch's longest
    kwise-packed   the same loss with each prompt encoded once for its answers and the sequences
                   packed into rows (RMTrainConfig.packing; rm_layout.pack_shared_prompts)
    kwise-compiled kwise-packed with RMTrainConfig.compile_model: the training step through
                   torch.compile (inductor), one decoder block compiled for all; the compilation
                   happens in the first step and counts in the epoch (first_step_s says how much:
                   a cold on-disk inductor cache or a warm one)
    trl-pairwise   TRL RewardTrainer on the pairs (rm_train.train_pairwise_baseline): each answer
                   is encoded K-1 = 6 times per epoch

Each eager run's row also says where its epoch went, measured alike on both sides from outside
the trainers (benchmarks.common.TrainingPhases): seconds in the model's forward, in the backward, in
optimizer steps and the rest (collation, clipping, bookkeeping), the tokens the model read
(padding included) and the forward-and-backward microseconds per token; the notes take the
speed-up apart into "TRL reads n times the tokens, each costing m times as much".

Target (issue 7): at least 10x less wall time per epoch than TRL at equal or better accuracy.
Reference before any project code: TRL 981 s, a plain K-wise loop 163 s (6.0x), accuracy 0.70 vs 0.68.

    python -m benchmarks.rm_epoch                       # all four, about 25 min on 2 CPU cores
    python -m benchmarks.rm_epoch --runs kwise-packed --train-prompts 40   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import tempfile
import time

import torch

from benchmarks.common import TrainingPhases, report
from starling_lib.rm_eval import evaluate_rankings
from starling_lib.rm_train import RMTrainConfig, load_rankings, train_pairwise_baseline, train_reward_model

RUNS = ("kwise-padded", "kwise-packed", "kwise-compiled", "trl-pairwise")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="which trainers to time")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per prompt + answer (truncation)")
    parser.add_argument("--pack-length", type=int, default=0, help="packed row length; 0: max-length")
    parser.add_argument("--batch-size", type=int, default=4, help="rankings per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rankings per forward pass")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--train-prompts", type=int, default=0, help="train on this many prompts; 0: all")
    parser.add_argument("--seed", type=int, default=0, help="split, head initialisation and data order")
    parser.add_argument("--name", default="rm_epoch", help="results/<name>.json")
    args = parser.parse_args(argv)

    base = RMTrainConfig(backbone="tiny", max_length=args.max_length, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, lr=args.lr, train_prompts=args.train_prompts,
                         seed=args.seed, device="cpu" if not torch.cuda.is_available() else "auto",
                         pack_length=args.pack_length, progress=True, save_model=False)
    split = load_rankings(base)
    n_train, test_rows = len(split["train"]), [split["test"][i] for i in range(len(split["test"]))]
    steps = math.ceil(n_train / args.batch_size)            # one epoch
    print(f"{n_train} training prompts -> {steps} steps of {args.batch_size}; {len(test_rows)} held-out prompts")

    rows = []
    for run in args.runs:
        cfg = dataclasses.replace(base, steps=steps, packing=run in ("kwise-packed", "kwise-compiled"),
                                  compile_model=run == "kwise-compiled")
        t0 = time.perf_counter()
        # Where each eager epoch's time goes, measured alike on both trainers (the compiled run's
        # graph would trace the probe's hooks).
        phases = TrainingPhases() if not cfg.compile_model else contextlib.nullcontext()
        with phases:
            if run == "trl-pairwise":
                with tempfile.TemporaryDirectory() as tmp:
                    result = train_pairwise_baseline(cfg, tmp)
            else:
                result = train_reward_model(cfg)
        total_s = time.perf_counter() - t0
        heldout = evaluate_rankings(result.model, test_rows, batch_size=16)
        first_step = next((h["rm/elapsed_s"] for h in result.history if h["step"] == 1 and "rm/elapsed_s" in h), None)
        rows.append({"trainer": run, "epoch_s": result.wall_s, "run_s_incl_loading": total_s,
                     **({"first_step_s": first_step} if first_step is not None else {}),
                     "answer_encodings": result.sequences,
                     **(phases.split(result.wall_s) if isinstance(phases, TrainingPhases) else {}),
                     "heldout_pair_accuracy": heldout["pair_accuracy"],
                     "heldout_top1": heldout["top1_accuracy"]})
        print(rows[-1])
    by = {r["trainer"]: r for r in rows}
    if "trl-pairwise" in by:
        for r in rows:
            r["speed-up vs TRL"] = by["trl-pairwise"]["epoch_s"] / r["epoch_s"]
    notes = (f"one epoch = {steps} optimizer steps of {args.batch_size} rankings ({n_train} prompts), "
             f"max_length {args.max_length}, micro-batch {args.micro_batch_size} rankings, lr {args.lr}; "
             f"accuracy on {len(test_rows)} held-out prompts (all pairs). Target: >= 10x vs TRL at >= accuracy."
             + where_time_goes(by))
    report(args.name, rows, notes)


def where_time_goes(by: dict[str, dict]) -> str:
    """The speed-up of the packed K-wise epoch over TRL's, taken apart: how many more tokens TRL's
    model reads, how much more each costs it (forward and backward), and the rest of each epoch."""
    ours, trl = by.get("kwise-packed"), by.get("trl-pairwise")
    if not (ours and trl and ours.get("model_tokens") and trl.get("model_tokens")):
        return ""
    split = lambda r: (f"forward {r['forward_s']:.1f} s, backward {r['backward_s']:.1f} s, "   # noqa: E731
                       f"optimizer {r['optimizer_s']:.1f} s, the rest {r['rest_s']:.1f} s")
    token_ratio = trl["model_tokens"] / ours["model_tokens"]
    cost_ratio = trl["us_per_token_fwd_bwd"] / ours["us_per_token_fwd_bwd"]
    return (f" Where the time goes: K-wise packed {split(ours)}, {ours['model_tokens'] / 1e3:.0f}K tokens through "
            f"the model (padding included) at {ours['us_per_token_fwd_bwd']:.0f} us each forward and backward; "
            f"TRL {split(trl)}, {trl['model_tokens'] / 1e3:.0f}K tokens at {trl['us_per_token_fwd_bwd']:.0f} us. "
            f"TRL reads {token_ratio:.2f}x the tokens, each costing {cost_ratio:.2f}x: "
            f"{token_ratio * cost_ratio:.2f}x in forward and backward, {trl['epoch_s'] / ours['epoch_s']:.2f}x "
            f"in all.")


if __name__ == "__main__":
    main()
