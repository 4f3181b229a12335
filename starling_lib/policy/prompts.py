"""Which prompts a policy-tuning run sees: the initial policy's name, the train/held-out split,
the length filter, and the step -> prompts schedule.

The split is notebooks 01 and 03's (`data.split_by_prompt` with the same seed), so the reward
model never trained on a prompt the policies are evaluated on. A step's prompts depend only on
(seed, step), as the reward-model trainer's batches do, so a resumed run sees the same prompts.
"""

from __future__ import annotations

from typing import Sequence

from starling_lib.data import load_nectar, prompt_to_messages, split_by_prompt
from starling_lib.policy.config import INITIAL_POLICY, PolicyTrainConfig
from starling_lib.training import batch_indices


def resolve_policy(name: str) -> str:
    """"sft-tiny" -> the cached SFT warm-up of the tiny model (built if missing); else `name` itself."""
    if name == INITIAL_POLICY:
        from starling_lib.sft import sft_policy_path
        return str(sft_policy_path())
    return name


def prompt_fits(tokenizer, prompts: Sequence[str], max_tokens: int) -> list[bool]:
    """For each Nectar prompt: whether it is at most `max_tokens` long in the tokenizer's chat format
    (generation prompt included). Longer prompts are skipped by every method, not truncated."""
    if not prompts:   # an empty split (e.g. test_fraction 0); the tokenizer fails on an empty list
        return []
    texts = [tokenizer.apply_chat_template(prompt_to_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return [len(ids) <= max_tokens for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def nectar_split(cfg: PolicyTrainConfig):
    """The run's Nectar records split into "train" and "test", as in notebooks 01 and 03."""
    return split_by_prompt(load_nectar(cfg.nectar_source, limit=cfg.max_prompts or None),
                           test_fraction=cfg.test_fraction, seed=cfg.seed)


def load_prompts(cfg: PolicyTrainConfig, tokenizer) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, evaluation prompts) as chat messages.

    Prompts longer than `cfg.max_prompt_tokens` in the chat format are skipped; evaluation keeps
    the first `cfg.eval_prompts` held-out prompts (all when 0).
    """
    split = nectar_split(cfg)

    def fitting(ds) -> list[list[dict]]:
        prompts = list(ds["prompt"]) if len(ds) else []
        return [prompt_to_messages(p) for p, ok in zip(prompts, prompt_fits(tokenizer, prompts, cfg.max_prompt_tokens))
                if ok]

    train, test = fitting(split["train"]), fitting(split["test"])
    if cfg.eval_prompts:
        test = test[:cfg.eval_prompts]
    if not train:
        raise ValueError(f"no training prompt fits max_prompt_tokens={cfg.max_prompt_tokens}")
    return train, test


def process_units(units: int, rank: int, num_processes: int) -> range:
    """Which of a step's `units` prompts (positions in its global batch) process `rank` samples and
    trains on: a contiguous share, the first `units % num_processes` processes taking one more
    (64 rollouts on 7 processes: 10, 9, 9, 9, 9, 9, 9)."""
    base, extra = divmod(units, num_processes)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def step_prompts(step: int, prompts: Sequence, cfg: PolicyTrainConfig, rank: int = 0, num_processes: int = 1) -> list:
    """This process's prompts of step `step`, each repeated `samples_per_prompt` times in consecutive
    rows ([a, a, b, b, ...]: P3O's pairs, or responses_per_prompt > 1)."""
    per_step = cfg.rollouts_per_step // cfg.samples_per_prompt
    idx = batch_indices(step, per_step, len(prompts), cfg.seed)
    return [prompts[idx[u]] for u in process_units(per_step, rank, num_processes) for _ in range(cfg.samples_per_prompt)]
