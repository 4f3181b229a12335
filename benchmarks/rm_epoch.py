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
                   torch.compile (inductor); the compilation happens in the first steps and counts
                   in the epoch (cold or warm on-disk inductor cache: see run_s and the notes)
    trl-pairwise   TRL RewardTrainer on the pairs (rm_train.train_pairwise_baseline): each answer
                   is encoded K-1 = 6 times per epoch

Target (issue 7): at least 10x less wall time per epoch than TRL at equal or better accuracy.
Reference before any project code: TRL 981 s, a plain K-wise loop 163 s (6.0x), accuracy 0.70 vs 0.68.

    python -m benchmarks.rm_epoch                       # all three, about 20 min on 2 CPU cores
    python -m benchmarks.rm_epoch --runs kwise-packed --train-prompts 40   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time

import torch

from benchmarks.common import report
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
        if run == "trl-pairwise":
            with tempfile.TemporaryDirectory() as tmp:
                result = train_pairwise_baseline(cfg, tmp)
        else:
            result = train_reward_model(cfg)
        total_s = time.perf_counter() - t0
        heldout = evaluate_rankings(result.model, test_rows, batch_size=16)
        rows.append({"trainer": run, "epoch_s": result.wall_s, "run_s_incl_loading": total_s,
                     "answer_encodings": result.sequences,
                     "heldout_pair_accuracy": heldout["pair_accuracy"],
                     "heldout_top1": heldout["top1_accuracy"]})
        print(rows[-1])
    by = {r["trainer"]: r for r in rows}
    if "trl-pairwise" in by:
        for r in rows:
            r["speed-up vs TRL"] = by["trl-pairwise"]["epoch_s"] / r["epoch_s"]
    notes = (f"one epoch = {steps} optimizer steps of {args.batch_size} rankings ({n_train} prompts), "
             f"max_length {args.max_length}, micro-batch {args.micro_batch_size} rankings, lr {args.lr}; "
             f"accuracy on {len(test_rows)} held-out prompts (all pairs). Target: >= 10x vs TRL at >= accuracy.")
    report(args.name, rows, notes)


if __name__ == "__main__":
    main()
