"""Held-out evaluation of a policy: mean reward and KL to the initial policy on fixed prompts.

A fixed set of held-out prompts (those notebook 03's reward model did not train on),
`eval_samples` responses each, sampled with a fixed seed, scored by the reward model; KL to the
initial policy on the same samples. Same prompts and random numbers for every method and for the
initial policy, so the comparison is paired (report.reward_gain).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch

from starling_lib import engines
from starling_lib.chat import stop_token_ids
from starling_lib.losses import kl_penalty
from starling_lib.models import default_device, load_model_and_tokenizer
from starling_lib.policy.config import PolicyTrainConfig
from starling_lib.policy.prompts import load_prompts, resolve_policy
from starling_lib.reward_client import load_reward_scorer
from starling_lib.rollout import SharedTrunkPolicy, generate


def ended_with_stop(batch, tokenizer) -> torch.Tensor:
    """(B,) bool: the response ended with a stop token (chat.stop_token_ids) rather than being cut at max_new_tokens."""
    stops = torch.tensor(stop_token_ids(tokenizer), device=batch.input_ids.device)
    return (torch.isin(batch.response_ids, stops) & batch.response_mask).any(-1)


@torch.no_grad()
def evaluate_policy(policy: SharedTrunkPolicy, tokenizer, reward_model, prompts: Sequence, *, samples: int = 2,
                    max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int = 0, batch_size: int = 32, autocast=None, engine: str = "auto",
                    shard: tuple[int, int] = (0, 1), gather: Callable[[list], list] | None = None) -> dict[str, Any]:
    """Mean reward and KL to the initial policy on fixed prompts, `samples` responses each.

    Sampling uses a private RNG seeded from `seed` and each batch's position (the caller's RNG is
    untouched), so two policies evaluated with the same arguments answer the same prompts with the
    same random numbers, however the batches are shared out.
    shard, gather: (rank, processes) and a function gathering a list from every process
    (accelerate.utils.gather_object): each process evaluates every `processes`-th batch and all
    get the whole result, the same as one process's.
    Returns reward_mean, reward_se (standard error over responses), kl (mean over responses of
    the k3 estimate summed over tokens) and kl_se (its standard error over prompts, each prompt's
    samples averaged first: they share the prompt), response_length, stop_frac (share that ended
    with a stop token), rewards, kls, lengths and stops (per response, prompt-major, for paired
    comparisons of two policies: report.paired_difference), and the (prompt, response, reward)
    of every response as examples.
    """
    autocast = autocast or contextlib.nullcontext
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    rows = [p for p in prompts for _ in range(samples)]
    starts = range(0, len(rows), batch_size)
    rank, processes = shard
    done = {}   # batch position -> its (rewards, kls, lengths, stops, examples)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i in range(rank, len(starts), processes):
            torch.manual_seed(seed * 1_000_003 + i)   # the batch's own random numbers, wherever it runs
            chunk = rows[starts[i]:starts[i] + batch_size]
            with autocast():
                batch = generate(policy.model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, do_sample=temperature > 0,
                                 engine=engine, keep_trunk=policy.split)
                # from the trunk output the sampler kept (the top layers only), else the full forward
                out = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True,
                             trunk=batch.trunk)
            mask = batch.response_mask
            responses = [r.strip() for r in batch.responses]
            done[i] = ((kl_penalty(out["logprobs"], out["ref_logprobs"], "k3") * mask).sum(-1).tolist(),
                       reward_model.score(chunk, responses, batch_size=batch_size).float().tolist(),
                       mask.sum(-1).float().tolist(), ended_with_stop(batch, tokenizer).float().tolist(),
                       [{"prompt": p[-1]["content"], "response": r} for p, r in zip(chunk, responses)])
    policy.train(was_training)
    if processes > 1:
        done = {i: part for shard_done in gather([done]) for i, part in shard_done.items()}
    parts = [done[i] for i in range(len(starts))]
    k, r, lengths, stops = (torch.tensor([v for part in parts for v in part[j]]) for j in range(4))
    examples = [e for part in parts for e in part[4]]
    for e, reward in zip(examples, r.tolist()):
        e["reward"] = reward
    return {"reward_mean": r.mean().item(), "reward_se": (r.std() / math.sqrt(len(r))).item() if len(r) > 1 else 0.0,
            "kl": k.mean().item(), "kl_se": _prompt_se(k, samples), "kls": k.tolist(),
            "response_length": lengths.mean().item(), "lengths": lengths.tolist(),
            "stop_frac": stops.mean().item(), "stops": stops.tolist(), "num_responses": len(r), "samples": samples,
            "rewards": r.tolist(),
            "examples": examples}


def _prompt_se(values: torch.Tensor, samples: int) -> float:
    """Standard error over prompts of the per-prompt means of `values` (prompt-major, `samples` each)."""
    per_prompt = values.view(-1, samples).mean(1)                  # (prompts,)
    return (per_prompt.std() / math.sqrt(len(per_prompt))).item() if len(per_prompt) > 1 else 0.0


def eval_settings(cfg: PolicyTrainConfig) -> dict[str, Any]:
    """`evaluate_policy`'s sampling settings from a config: the same for every method and the initial policy."""
    return dict(samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                engine=cfg.rollout_engine)


def evaluate_initial(cfg: PolicyTrainConfig, reward_model=None) -> dict[str, Any]:
    """`evaluate_policy` of the initial policy with `cfg`'s evaluation settings: the baseline every
    method's evaluations are compared with (their step-0 evaluation is the same, prompt for prompt)."""
    device = torch.device("cpu") if cfg.device == "cpu" else default_device()
    model, tokenizer = load_model_and_tokenizer(resolve_policy(cfg.policy), device=device)
    with torch.random.fork_rng(devices=[]):
        # The initial policy is its own reference whichever layers train (a LoRA run's -1: any will do).
        policy = SharedTrunkPolicy(model, max(cfg.unfrozen_layers, 1), value_head=False)
    if reward_model is None:
        reward_model = load_reward_scorer(cfg.reward_model, device=device,
                                          dtype=torch.bfloat16 if device.type == "cuda" else None)
    _, prompts = load_prompts(cfg, tokenizer)
    try:
        return evaluate_policy(policy, tokenizer, reward_model, prompts, **eval_settings(cfg))
    finally:
        engines.release(model)   # a vllm engine made for this model (the run's own policy gets its own)


def policy_with_reference(initial_path: str, tuned_model, num_trainable_layers: int, device=None) -> SharedTrunkPolicy:
    """A SharedTrunkPolicy whose reference is the initial policy at `initial_path` and whose policy
    is `tuned_model` (a causal LM tuned from it with only the top layers trained, e.g. by DPO).

    Used to evaluate a model trained elsewhere exactly as the online methods are evaluated.
    """
    initial, _ = load_model_and_tokenizer(initial_path, device=device or next(tuned_model.parameters()).device,
                                          dtype=next(tuned_model.parameters()).dtype)
    policy = SharedTrunkPolicy(initial, num_trainable_layers, value_head=False)
    policy.model.load_state_dict(tuned_model.state_dict())   # the reference layers keep the initial weights
    return policy.eval()
