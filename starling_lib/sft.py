"""Supervised warm-up on Nectar answers: the initial policy of the embedded default.

Starling started from Openchat-3.5, already a good chat model. The offline "tiny" model starts
from random weights, so before RLHF it is taught to write text-like replies in the chat format:
next-token prediction on Nectar answers in the OpenChat-3.5 format, with the loss on the answer
tokens only (the prompt is context, not a target). The result is cached on disk like the tiny
model itself (keyed by the base model and every setting), so notebooks 04 and 05 share one
initial policy and only the first run pays for it.

    path = sft_policy_path()      # the cached folder; built on first use (70-80 s on 2 idle CPU cores)
    model, tokenizer = load_model_and_tokenizer(str(path))

At full scale this step is skipped: the initial policy is a hub model (Openchat-3.5).

Departures from a usual SFT stage (chosen by measuring what a tiny model learns in about a minute
of CPU; see `SFTConfig`):
- all 7 ranked answers of each prompt are training targets by default, not only the best one:
  seven times the text, and the tiny model needs text more than it needs quality;
- sequences are short (the last 24 prompt tokens, the first 48 answer tokens), so many more
  steps fit in the time; an answer cut short gets no `<|end_of_turn|>`, so the model learns to
  stop only from answers that fit;
- small batches (8) and a cosine schedule from 1e-3 down to 1e-4: more updates per token;
- the held-out prompts of notebooks 01/03 are left out, so notebook 04 evaluates on unseen prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from starling_lib.data import END_OF_TURN, format_chat, load_nectar, prompt_to_messages, ranked, split_by_prompt
from starling_lib.runs import build_atomically, cache_dir
from starling_lib.training import batch_indices

IGNORE = -100  # label value that cross_entropy skips
SFT_FORMAT_VERSION = 2  # bump when the recipe changes in a way the settings do not show; part of the cache key


@dataclass(frozen=True)
class SFTConfig:
    """Settings of the warm-up fine-tuning. Every field is part of the cache key."""

    steps: int = 600
    """Optimiser steps. The data (~360 training prompts x 7 answers) wraps around in a fresh order
    each epoch; 600 steps of 8 are about two epochs."""

    batch_size: int = 8
    """(prompt, answer) examples per step. Smaller batches learn more per token here (measured)."""

    lr: float = 1e-3
    """Peak AdamW learning rate. 3e-3 and above stall the tiny model at unigram statistics (measured)."""

    warmup_steps: int = 20
    """Linear warm-up, then a cosine decay to a tenth of `lr` at the last step."""

    answers_per_prompt: int = 7
    """Ranked answers per prompt used as targets: 1 = the best only, 7 = all of Nectar's."""

    max_prompt_tokens: int = 24
    """Prompt tokens kept: the end of the conversation (the turn being answered and the assistant cue)."""

    max_answer_tokens: int = 48
    """Answer tokens kept from the start; an answer that fits ends with `<|end_of_turn|>`."""

    test_fraction: float = 0.1
    """Prompts left out, split as in notebooks 01 and 03 (same seed): notebook 04 evaluates on them,
    so the initial policy has not seen their answers."""

    seed: int = 0
    """Seed of the held-out split and of the data order."""


def sft_examples(ds, tokenizer, cfg: SFTConfig) -> list[dict]:
    """(input_ids, labels) per (prompt, answer): the chat-formatted prompt, then the answer.

    labels are IGNORE on the prompt and the answer's token ids (plus `<|end_of_turn|>` when the
    answer fits) on the answer.
    """
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    examples = []
    for rec in ds:
        prompt = format_chat(prompt_to_messages(rec["prompt"]), add_generation_prompt=True, bos=tokenizer.bos_token or "")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens:]
        for answer in ranked(rec)[:cfg.answers_per_prompt]:
            # " " + answer: the template puts a space after "Assistant:", as chat_texts does.
            a_ids = tokenizer(" " + answer["answer"], add_special_tokens=False)["input_ids"]
            a_ids = a_ids[:cfg.max_answer_tokens] if len(a_ids) >= cfg.max_answer_tokens else a_ids + [eot]
            examples.append({"input_ids": p_ids + a_ids, "labels": [IGNORE] * len(p_ids) + a_ids})
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (IGNORE on padding) and attention_mask, each (B, T)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id)
    labels = torch.full((len(examples), T), IGNORE)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_sft(model, tokenizer, examples: list[dict], cfg: SFTConfig, progress: bool = True) -> list[float]:
    """Fine-tune `model` in place on `examples`; returns the loss of every step."""
    from tqdm.auto import tqdm


    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="SFT warm-up on Nectar answers", disable=not progress)
    for step in bar:
        # The batch is a function of (seed, step): a fresh permutation of the examples per epoch.
        b = collate([examples[i] for i in batch_indices(step, cfg.batch_size, len(examples), cfg.seed)],
                    tokenizer.pad_token_id)
        loss = model(**{k: v.to(device) for k, v in b.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def sft_cache_key(base_id: str, nectar_source: str, cfg: SFTConfig) -> str:
    """Short hash of everything that determines the fine-tuned weights; names the cache folder."""
    payload = {"base": base_id, "nectar": nectar_source, "cfg": dataclasses.asdict(cfg), "format": SFT_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def sft_policy_path(base: str = "tiny", nectar_source: str = "bundled", cfg: SFTConfig = SFTConfig(),
                    progress: bool = True, **tiny_overrides) -> Path:
    """Folder of `base` fine-tuned on Nectar answers (a from_pretrained folder), built if missing.

    Cached in `cache_dir()/sft/<key>` with the per-step losses and the wall time in
    `sft_history.json`. `tiny_overrides` are `TinyConfig` fields of the "tiny" base.
    """
    from starling_lib.models import load_model_and_tokenizer, tiny_model_path

    base_id = str(tiny_model_path(**tiny_overrides)) if base == "tiny" else base
    # The tiny model by its own cache key, not its path: a cache moved elsewhere stays valid.
    key_base = f"tiny:{Path(base_id).name}" if base == "tiny" else base
    root = cache_dir() / "sft"
    final = root / sft_cache_key(key_base, nectar_source, cfg)
    if final.is_dir():
        return final
    model, tokenizer = load_model_and_tokenizer(base_id, device="cpu" if base == "tiny" else None, dtype=torch.float32)
    t0 = time.perf_counter()
    train = split_by_prompt(load_nectar(nectar_source), test_fraction=cfg.test_fraction, seed=cfg.seed)["train"]
    losses = train_sft(model, tokenizer, sft_examples(train, tokenizer, cfg), cfg, progress)
    wall_s = time.perf_counter() - t0

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_history.json").write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "base": base_id, "nectar_source": nectar_source,
             "format": SFT_FORMAT_VERSION, "wall_s": wall_s, "losses": losses}))
    return build_atomically(final, write)


def sft_history(path: str | os.PathLike) -> dict:
    """What `sft_policy_path` recorded about the fine-tuning: config, losses, wall_s."""
    return json.loads((Path(path) / "sft_history.json").read_text())
