"""Online policy tuning against the reward model: APA, PPO and P3O in one loop (DPO: starling_lib.dpo).

Starling-LM-7B-alpha is Openchat-3.5 tuned online against Starling-RM-7B-alpha with APA, only
its last 4 layers unfrozen. No RLHF library ships APA or P3O (and TRL 1.16 no longer ships PPO),
so this module is the trainer, written top to bottom:

  for each step:
      take the step's prompts (a function of the seed and the step, as in rm_train)
      sample one response per prompt (P3O: two per prompt, half the prompts), score each with the RM
      one no-grad forward of the SharedTrunkPolicy: log-probs under the policy (the "old" ones of
          PPO's ratio) and under the reference (the initial policy), values, entropy
      per-token KL to the reference; rewards; advantages:
          PPO  reward = RM score on the last token - beta * KL_t per token; GAE; whitened
          APA  reward = RM score on the last token (no KL term: the loss itself anchors to pi_init); GAE; whitened
          P3O  r_i = RM(y_i) - beta * sum_t KL_t per response; the pair's difference r_1 - r_2
      for each of `epochs_per_batch` epochs, for each shuffled minibatch (one optimizer step,
      its gradient accumulated over micro-batches):
          PPO  clipped surrogate + vf_coef * clipped value loss
          APA  (log pi - log pi_init - A / lam)^2 + vf_coef * clipped value loss
          P3O  pairwise clipped objective (joint or separate clipping), no critic
      log reward, KL to the initial policy, entropy, response length, clip fraction, value loss

In a notebook (one device):

    result = train_policy(PolicyTrainConfig(method="apa", reward_model=str(rm_dir), eval_every=8))

On many GPUs (accelerate; DDP is the natural fit, as only the top layers train):

    accelerate launch --config_file configs/accelerate/ddp.yaml -m starling_lib.policy configs/policy/starling_apa_7b.yaml
    python -m starling_lib.policy configs/policy/tiny_cpu.yaml --set method=ppo --set steps=4

Checkpoints (`checkpoint_every`) hold the model, optimizer, scheduler and RNG states
(`accelerator.save_state`, as in rm_train); the prompts and the sampling seed of a step are
functions of (seed, step), so a resumed run ends with the same weights as an uninterrupted one.

Evaluation (`evaluate_policy`): a fixed set of held-out prompts (those notebook 03's reward model
did not train on), `eval_samples` responses each, sampled with a fixed seed, scored by the reward
model; KL to the initial policy on the same samples. Same prompts and seed for every method and
for the initial policy, so the comparison is paired.

Departures from the papers and Starling (all documented in PolicyTrainConfig too):
- the reference shares the trunk with the policy (rollout.SharedTrunkPolicy), and the value head
  sits on the policy's last hidden state (PPO's critic shares the trainable layers);
- advantages are whitened per process (not over all processes) and per rollout batch;
- the reward model scores each response as a finished turn (`<|end_of_turn|>` appended) even
  when it was cut at max_new_tokens; no penalty for a missing end of turn;
- prompts longer than `max_prompt_tokens` are skipped, not truncated;
- dropout is off throughout (the policy stays in eval mode), as in TRL;
- reported KL is the k3 estimator summed over a response's tokens (non-negative, unbiased);
  the penalty uses `kl_estimator` (k1 by default, as Ziegler et al. and TRL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from starling_lib.losses import (apa_loss, gae, kl_penalty, masked_mean, masked_whiten, p3o_loss, ppo_policy_loss,
                                 ppo_value_loss)
from starling_lib.rollout import SharedTrunkPolicy, generate, iterate_minibatches, per_token_rewards

METHODS = ("apa", "ppo", "p3o", "dpo")
STAGE = "04_policy_tuning"            # the notebook's folder in a run; notebook 05 looks in STAGE/policies
INITIAL_POLICY = "sft-tiny"           # name of the embedded default's initial policy (see resolve_policy)


@dataclass
class PolicyTrainConfig:
    """One policy-tuning run. Every field can be set from a YAML file or `--set key=value`."""

    policy: str = INITIAL_POLICY
    """Initial policy: "sft-tiny" (the tiny model after the cached SFT warm-up, starling_lib.sft),
    a hub id such as "openchat/openchat_3.5", or a local from_pretrained folder."""

    reward_model: str = ""
    """Folder of a reward model saved by notebook 03 / rm_train (`reward_model.load_reward_model`)."""

    method: str = "apa"
    """"apa", "ppo", "p3o" (online, this module) or "dpo" (offline, TRL's DPOTrainer, starling_lib.dpo)."""

    nectar_source: str = "bundled"
    """Where the prompts (and DPO's pairs) come from: "bundled", "berkeley-nest/Nectar" or a file."""

    max_prompts: int = 0
    """Read at most this many Nectar records; 0 reads all."""

    test_fraction: float = 0.1
    """Share of prompts held out for evaluation, split as in notebooks 01 and 03 (so the reward
    model never trained on the evaluation prompts)."""

    max_prompt_tokens: int = 64
    """Prompts longer than this (in the chat format) are skipped. Starling: 1024."""

    steps: int = 32
    """Optimisation steps: each samples `rollouts_per_step` responses and trains on them."""

    rollouts_per_step: int = 8
    """Responses sampled per step over all processes. APA/PPO: one per prompt; P3O: two per prompt
    for half as many prompts, so every method generates the same number of responses. Starling: 64."""

    minibatch_size: int = 4
    """Responses per optimizer step over all processes: ceil(rollouts_per_step / minibatch_size)
    optimizer steps per epoch, the last one on what is left. Starling: 28 (its "batch 28")."""

    micro_batch_size: int = 4
    """Responses per forward/backward on one device; gradient accumulation makes up the minibatch."""

    epochs_per_batch: int = 2
    """Passes over each rollout batch (PPO's epochs). Starling: 2."""

    max_new_tokens: int = 32
    """Most tokens per response. Starling: 1024."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts (and of the evaluation samples)."""

    top_p: float = 1.0
    """Nucleus sampling mass of the rollouts."""

    top_k: int = 0
    """Sample among the k most likely tokens only; 0 samples from the whole vocabulary, the
    distribution the losses score (as TRL does; `generate`'s own default would be 50)."""

    rollout_engine: str = "auto"
    """How rollouts are sampled: "fast" (starling_lib.sampling: a preallocated KV cache, about 2x
    `generate` on the tiny model), "hf" (`model.generate`), "auto" (fast where supported)."""

    lr: float = 2e-4
    """AdamW learning rate of the trainable layers and the value head. Starling (APA, 7B): 2e-7; the
    tiny model barely moves at that, and at 1e-4 gains about half as much reward in 32 steps (measured)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    warmup_steps: int = 0
    """Linear warm-up steps (in training steps, not optimizer steps)."""

    lr_schedule: str = "constant"
    """After warm-up: "constant", "linear" or "cosine" (to 0 at the last step)."""

    max_grad_norm: float = 1.0
    """Clip the gradient norm of each optimizer step to this; 0 disables clipping."""

    unfrozen_layers: int = 2
    """Top decoder layers trained (and duplicated as the frozen reference). Starling: 4 of 32;
    the tiny model has 4 layers."""

    score_norm: str = "center"
    """What the RM scores go through before they become rewards: "none"; "center" (subtract the
    rollout batch's mean: a baseline, so the critic that starts at zero is not off by the reward
    model's offset); "whiten" (also divide by the batch's standard deviation). Ours; P3O only
    sees score differences, so "center" changes nothing there."""

    beta: float = 0.05
    """KL penalty coefficient of PPO's per-token reward and of P3O's per-response reward (APA has none)."""

    lam: float = 0.1
    """APA's lambda: the loss pulls log(pi / pi_init) towards A / lam (the APA authors' and Starling's 0.1)."""

    clip_eps: float = 0.2
    """PPO / P3O ratio clipping range."""

    clip_eps_v: float = 0.2
    """Value clipping range (PPO and APA critics)."""

    vf_coef: float = 0.1
    """Weight of the value loss next to the policy loss (PPO, APA)."""

    gamma: float = 1.0
    """GAE discount."""

    gae_lambda: float = 0.95
    """GAE lambda."""

    whiten_advantages: bool = True
    """Normalise the advantages of each rollout batch to zero mean, unit variance (PPO, APA)."""

    kl_estimator: str = "k1"
    """Per-token KL estimate in the rewards: "k1" (log ratio) or "k3" (non-negative)."""

    p3o_variant: str = "joint"
    """P3O clipping: "joint" (one ratio for the pair) or "separate" (a ratio per response)."""

    dpo_beta: float = 0.1
    """DPO's beta (method "dpo" only)."""

    dpo_max_length: int = 0
    """DPO: tokens kept of prompt + answer (the answer's end is cut); 0 means max_prompt_tokens + max_new_tokens."""

    eval_every: int = 0
    """Evaluate on the held-out prompts every this many steps, before the first and after the last; 0 never."""

    eval_prompts: int = 0
    """Held-out prompts in each evaluation; 0 all of them (within max_prompt_tokens)."""

    eval_samples: int = 4
    """Responses per held-out prompt in each evaluation (sampled at `temperature` with a fixed seed)."""

    eval_batch_size: int = 32
    """Responses per generate() call in evaluation."""

    mixed_precision: str = "auto"
    """"auto": what `accelerate launch` was told, else bf16 on a GPU that has it, else "no"; or
    "no", "bf16", "fp16". On a GPU the frozen weights load in bf16 and the trained ones stay float32."""

    device: str = "auto"
    """"auto" (a GPU when there is one), "cpu" or "cuda"."""

    seed: int = 0
    """Seed of the split, the prompt order, the sampling and the minibatch order."""

    output_dir: str = ""
    """Checkpoints go to output_dir/checkpoints/, the tuned policy to output_dir/policy/ (a
    from_pretrained folder). "" keeps nothing on disk."""

    checkpoint_every: int = 0
    """Save a checkpoint every this many steps; 0 never. Needs output_dir."""

    keep_checkpoints: int = 2
    """Most recent checkpoints kept; older ones are deleted."""

    resume: bool = True
    """Continue from the latest checkpoint in output_dir if there is one (same config required)."""

    save_policy: bool = True
    """Save the tuned policy to output_dir/policy/ at the end (when output_dir is set)."""

    progress: bool = True
    """Show a progress bar over rollout batches."""

    # Fields that do not change the trained weights: a checkpoint may be resumed under new values.
    _NOT_IN_FINGERPRINT = ("output_dir", "checkpoint_every", "keep_checkpoints", "resume", "save_policy",
                           "progress", "eval_every", "eval_prompts", "eval_samples", "eval_batch_size")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lr_schedule not in {"constant", "linear", "cosine"}:
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if self.kl_estimator not in {"k1", "k3"}:
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.score_norm not in {"none", "center", "whiten"}:
            raise ValueError(f"score_norm must be none, center or whiten, got {self.score_norm!r}")
        if self.rollout_engine not in {"auto", "fast", "hf"}:
            raise ValueError(f"rollout_engine must be auto, fast or hf, got {self.rollout_engine!r}")
        if self.p3o_variant not in {"joint", "separate"}:
            raise ValueError(f"p3o_variant must be joint or separate, got {self.p3o_variant!r}")
        if not 0 < self.micro_batch_size <= self.minibatch_size <= self.rollouts_per_step:
            raise ValueError(f"need micro_batch_size <= minibatch_size <= rollouts_per_step, got {self.micro_batch_size}, "
                             f"{self.minibatch_size}, {self.rollouts_per_step}")
        if self.method == "p3o" and (self.rollouts_per_step % 2 or self.minibatch_size % 2 or self.micro_batch_size % 2):
            raise ValueError("P3O trains on pairs of responses: rollouts_per_step, minibatch_size and "
                             "micro_batch_size must be even")
        if self.checkpoint_every and not self.output_dir:
            raise ValueError("checkpoint_every needs an output_dir to write checkpoints to")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def samples_per_prompt(self) -> int:
        """Responses per prompt in a rollout batch: 2 for P3O (a pair), else 1."""
        return 2 if self.method == "p3o" else 1

    def fingerprint(self) -> dict[str, Any]:
        """The fields that determine the trained weights (what a checkpoint must agree with)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_IN_FINGERPRINT}


@dataclass
class PolicyTrainResult:
    """What a policy-tuning run returns."""

    policy: Any                # the SharedTrunkPolicy (unwrapped): .model is the tuned causal LM
    tokenizer: Any
    history: list[dict]        # one dict per step: step and policy/<method>/<metric> keys
    evals: list[dict]          # one dict per evaluation: step and policy/<method>/eval_<metric> keys
    wall_s: float              # seconds spent training in this run (evaluations excluded)
    eval_s: float              # seconds spent evaluating
    steps_run: int             # steps done in this run (fewer than cfg.steps after a resume)
    config: PolicyTrainConfig
    policy_dir: Path | None = None
    extra: dict = field(default_factory=dict)
    eval_details: list[dict] = field(default_factory=list)   # evaluate_policy's full output, this run's evaluations


# --------------------------------------------------------------------------------------------
# models and prompts


def resolve_policy(name: str) -> str:
    """"sft-tiny" -> the cached SFT warm-up of the tiny model (built if missing); else `name` itself."""
    if name == INITIAL_POLICY:
        from starling_lib.sft import sft_policy_path
        return str(sft_policy_path())
    return name


def load_prompts(cfg: PolicyTrainConfig, tokenizer) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, evaluation prompts) as chat messages, split as in notebooks 01 and 03.

    Prompts longer than `cfg.max_prompt_tokens` in the chat format are skipped; evaluation keeps
    the first `cfg.eval_prompts` held-out prompts (all when 0).
    """
    from starling_lib.data import load_nectar, prompt_to_messages, split_by_prompt

    split = split_by_prompt(load_nectar(cfg.nectar_source, limit=cfg.max_prompts or None),
                            test_fraction=cfg.test_fraction, seed=cfg.seed)

    def fitting(ds) -> list[list[dict]]:
        messages = [prompt_to_messages(p) for p in ds["prompt"]]
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        if not texts:   # an empty split (e.g. test_fraction 0); the tokenizer fails on an empty list
            return []
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [m for m, n in zip(messages, lengths) if n <= cfg.max_prompt_tokens]

    train, test = fitting(split["train"]), fitting(split["test"])
    if cfg.eval_prompts:
        test = test[:cfg.eval_prompts]
    if not train:
        raise ValueError(f"no training prompt fits max_prompt_tokens={cfg.max_prompt_tokens}")
    return train, test


def step_prompts(step: int, prompts: Sequence, cfg: PolicyTrainConfig, rank: int = 0, num_processes: int = 1) -> list:
    """This process's prompts of step `step`, each repeated `samples_per_prompt` times (P3O: [a, a, b, b, ...]).

    The step's global prompts depend only on (seed, step), as rm_train's batches do.
    """
    from starling_lib.rm_train import batch_indices

    per_step = cfg.rollouts_per_step // cfg.samples_per_prompt
    idx = batch_indices(step, per_step, len(prompts), cfg.seed)
    share = per_step // num_processes
    return [prompts[i] for i in idx[rank * share:(rank + 1) * share] for _ in range(cfg.samples_per_prompt)]


def policy_with_reference(initial_path: str, tuned_model, num_trainable_layers: int, device=None) -> SharedTrunkPolicy:
    """A SharedTrunkPolicy whose reference is the initial policy at `initial_path` and whose policy
    is `tuned_model` (a causal LM tuned from it with only the top layers trained, e.g. by DPO).

    Used to evaluate a model trained elsewhere exactly as the online methods are evaluated.
    """
    from starling_lib.models import load_model_and_tokenizer

    initial, _ = load_model_and_tokenizer(initial_path, device=device or next(tuned_model.parameters()).device,
                                          dtype=next(tuned_model.parameters()).dtype)
    policy = SharedTrunkPolicy(initial, num_trainable_layers, value_head=False)
    policy.model.load_state_dict(tuned_model.state_dict())   # the reference layers keep the initial weights
    return policy.eval()


def parameter_counts(name_or_path: str, num_trainable_layers: int) -> dict[str, int]:
    """Parameters of the whole model, of what SharedTrunkPolicy trains, and of its reference copy.

    Counted on the meta device from the config alone: no weights are loaded (cheap for a 7B model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from starling_lib.models import count_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    shared = SharedTrunkPolicy(model, num_trainable_layers)
    return {"whole model": count_parameters(model),
            f"trained: top {num_trainable_layers} layers + value head": count_parameters(shared, trainable_only=True),
            f"reference: frozen copy of the top {num_trainable_layers} layers": count_parameters(shared.ref_layers),
            "a separate reference model instead": count_parameters(model)}


def save_policy(model, tokenizer, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Save a causal LM and its tokenizer as a from_pretrained folder (what notebook 05 loads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if info is not None:
        (path / "policy_training.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def policies_dir(run_dir: str | os.PathLike | None) -> Path:
    """`run_dir/04_policy_tuning/policies`: one from_pretrained folder per policy, for notebook 05."""
    from starling_lib.runs import stage_dir
    return stage_dir(run_dir, STAGE) / "policies"


def load_or_train_reward_model(run_dir: str | os.PathLike | None, steps: int = 30, device: str = "auto",
                               seed: int = 0, progress: bool = True) -> tuple[Path, bool]:
    """(folder of notebook 03's reward model in this run, whether it had to be trained here).

    When notebook 03 has not run in `run_dir`, trains a small K-wise reward model on the tiny
    backbone with rm_train (notebook 03's default settings, `steps` steps) and saves it where
    notebook 03 would have, so later runs reuse it.
    """
    from starling_lib.reward_model import CONFIG_FILE, reward_model_dir
    from starling_lib.rm_train import RMTrainConfig, train_reward_model

    path = reward_model_dir(run_dir)
    if (path / CONFIG_FILE).exists():
        return path, False
    cfg = RMTrainConfig(backbone="tiny", steps=steps, device=device, seed=seed, output_dir=str(path.parent),
                        progress=progress)   # the other settings: RMTrainConfig's defaults, notebook 03's demo
    result = train_reward_model(cfg)
    assert result.model_dir == path, (result.model_dir, path)
    return path, True


# --------------------------------------------------------------------------------------------
# evaluation


def ended_with_stop(batch, tokenizer) -> torch.Tensor:
    """(B,) bool: the response ended with `<|end_of_turn|>` / eos rather than being cut at max_new_tokens."""
    from starling_lib.chat import stop_token_ids

    stops = torch.tensor(stop_token_ids(tokenizer), device=batch.input_ids.device)
    return (torch.isin(batch.response_ids, stops) & batch.response_mask).any(-1)


@torch.no_grad()
def evaluate_policy(policy: SharedTrunkPolicy, tokenizer, reward_model, prompts: Sequence, *, samples: int = 2,
                    max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int = 0, batch_size: int = 32, autocast=None, engine: str = "auto") -> dict[str, Any]:
    """Mean reward and KL to the initial policy on fixed prompts, `samples` responses each.

    Sampling uses a private RNG seeded with `seed` (the caller's RNG is untouched), so two policies
    evaluated with the same arguments answer the same prompts with the same random numbers.
    Returns reward_mean, reward_se (standard error over responses), kl (mean over responses of
    the k3 estimate summed over tokens), response_length, stop_frac (share that ended with
    `<|end_of_turn|>`), and a few (prompt, response, reward) examples.
    """
    autocast = autocast or contextlib.nullcontext
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    rows = [p for p in prompts for _ in range(samples)]
    rewards, kls, lengths, stops, examples = [], [], [], [], []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            with autocast():
                batch = generate(policy.model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, do_sample=temperature > 0,
                                 engine=engine)
                out = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True)
            m = batch.response_mask
            kls.append((kl_penalty(out["logprobs"], out["ref_logprobs"], "k3") * m).sum(-1).cpu())
            lengths.append(m.sum(-1).float().cpu())
            stops.append(ended_with_stop(batch, tokenizer).float().cpu())
            responses = [r.strip() for r in batch.responses]
            rewards.append(reward_model.score(chunk, responses, batch_size=batch_size).float().cpu())
            examples += [{"prompt": p[-1]["content"], "response": r} for p, r in zip(chunk, responses)]
    policy.train(was_training)
    r, k = torch.cat(rewards), torch.cat(kls)
    for e, reward in zip(examples, r.tolist()):
        e["reward"] = reward
    return {"reward_mean": r.mean().item(), "reward_se": (r.std() / math.sqrt(len(r))).item() if len(r) > 1 else 0.0,
            "kl": k.mean().item(), "response_length": torch.cat(lengths).mean().item(),
            "stop_frac": torch.cat(stops).mean().item(), "num_responses": len(r), "samples": samples, "rewards": r.tolist(),
            "examples": examples}


def evaluate_initial(cfg: PolicyTrainConfig) -> dict[str, Any]:
    """`evaluate_policy` of the initial policy with `cfg`'s evaluation settings: the baseline every
    method's evaluations are compared with (their step-0 evaluation is the same, prompt for prompt)."""
    from starling_lib.models import default_device, load_model_and_tokenizer
    from starling_lib.reward_model import load_reward_model

    device = torch.device("cpu") if cfg.device == "cpu" else default_device()
    model, tokenizer = load_model_and_tokenizer(resolve_policy(cfg.policy), device=device)
    with torch.random.fork_rng(devices=[]):
        policy = SharedTrunkPolicy(model, cfg.unfrozen_layers, value_head=False)
    reward_model = load_reward_model(cfg.reward_model, device=device,
                                     dtype=torch.bfloat16 if device.type == "cuda" else None)
    _, prompts = load_prompts(cfg, tokenizer)
    return evaluate_policy(policy, tokenizer, reward_model, prompts, **eval_settings(cfg))


def eval_settings(cfg: PolicyTrainConfig) -> dict[str, Any]:
    """`evaluate_policy`'s sampling settings from a config: the same for every method and the initial policy."""
    return dict(samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                engine=cfg.rollout_engine)


# --------------------------------------------------------------------------------------------
# the trainer


def check_not_fsdp(accelerator) -> None:
    """Refuse FSDP for policy tuning, with the reason, before a 7B model is loaded.

    Rollouts and evaluation call the policy's inner causal LM (`model.generate`, or the sampler),
    outside the forward of the wrapping SharedTrunkPolicy. Under FSDP the embeddings, final norm
    and lm_head belong to that root unit and stay sharded there, so the first rollout would fail
    with "mixed torch.Tensor and DTensor". DDP needs no sharding here: with 4 of 32 layers trained,
    a 7B policy, its reference layers and the optimizer state fit on one 80 GB GPU per process.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("policy tuning does not run under FSDP (rollouts call the inner model, whose "
                         "embeddings and lm_head the root FSDP unit keeps sharded); launch it with "
                         "configs/accelerate/ddp.yaml")


def _make_accelerator(cfg: PolicyTrainConfig):
    from accelerate import Accelerator

    from starling_lib.training import mixed_precision

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=mixed_precision(cfg))
    check_not_fsdp(accelerator)
    n, unit = accelerator.num_processes, cfg.samples_per_prompt
    if cfg.rollouts_per_step % (n * unit) or cfg.minibatch_size % (n * unit):
        raise ValueError(f"rollouts_per_step={cfg.rollouts_per_step} and minibatch_size={cfg.minibatch_size} must "
                         f"split evenly into {n} process(es)" + (" (in pairs, for P3O)" if unit == 2 else ""))
    return accelerator


def _load_policy(cfg: PolicyTrainConfig, device: torch.device):
    """(SharedTrunkPolicy, tokenizer): frozen weights in the device's default dtype (bf16 on a GPU),
    the trained layers and the value head in float32 (the optimizer's master weights)."""
    from starling_lib.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(resolve_policy(cfg.policy), device=device)
    with torch.random.fork_rng(devices=[]):
        policy = SharedTrunkPolicy(model, cfg.unfrozen_layers, value_head=cfg.method in ("apa", "ppo"))
    for layer in policy.model.model.layers[policy.split:]:
        layer.float()
    return policy.eval(), tokenizer


def _chunks(indices: torch.Tensor, size: int):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def optimizer_steps_per_step(cfg: PolicyTrainConfig) -> int:
    """Optimizer steps per training step: epochs x minibatches per rollout batch (the last may be partial)."""
    return cfg.epochs_per_batch * math.ceil(cfg.rollouts_per_step / cfg.minibatch_size)


def normalize_scores(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Reward-model scores (B,) of one rollout batch: as they are ("none"), minus their mean
    ("center"), or standardised ("whiten")."""
    if kind == "none":
        return scores
    centered = scores - scores.mean()
    if kind == "center":
        return centered
    return centered / (scores.std() + 1e-8) if len(scores) > 1 else centered


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Sampling of step `step` on process `rank`: reproducible after a resume, different per process.
    return (seed * 1_000_003 + step * 7919 + rank) % (2**31 - 1)


def method_loss(cfg: PolicyTrainConfig, out: dict, mb: dict) -> tuple[torch.Tensor, dict]:
    """(loss, stats) of one micro-batch for `cfg.method`.

    out: the policy's forward on the micro-batch (logprobs, and values for APA / PPO).
    mb:  the rollout's tensors for those rows: mask, old_logprobs, ref_logprobs, and advantages,
         values, returns (APA, PPO) or reward_diff (P3O; rows are pairs, first response first).
    """
    if cfg.method == "p3o":
        lp, old, mask = out["logprobs"], mb["old_logprobs"], mb["mask"]
        loss, stats = p3o_loss(lp[0::2], old[0::2], mask[0::2], lp[1::2], old[1::2], mask[1::2],
                               mb["reward_diff"][0::2], cfg.clip_eps, cfg.p3o_variant)
        return loss, {"policy_loss": loss.detach(), **stats}
    if cfg.method == "ppo":
        pg_loss, stats = ppo_policy_loss(out["logprobs"], mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_eps)
    else:
        pg_loss, stats = apa_loss(out["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["mask"], cfg.lam)
        with torch.no_grad():  # how far this update has moved from the rollout policy
            stats["approx_kl"] = masked_mean(kl_penalty(mb["old_logprobs"], out["logprobs"], "k3"), mb["mask"])
    vf_loss, vf_stats = ppo_value_loss(out["values"], mb["values"], mb["returns"], mb["mask"], cfg.clip_eps_v)
    return pg_loss + cfg.vf_coef * vf_loss, {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                                              **stats, **vf_stats}


def train_policy(cfg: PolicyTrainConfig, stop_after: int | None = None) -> PolicyTrainResult:
    """Tune the initial policy against the reward model as `cfg` says; resume from a checkpoint if there is one.

    stop_after: end this run after that many steps in total (as if interrupted), for the resume
        test and time-boxed jobs; a later call with the same config continues.
    method "dpo" is handed to `starling_lib.dpo.train_dpo`.
    """
    if cfg.method == "dpo":
        from starling_lib.dpo import train_dpo
        return train_dpo(cfg, stop_after=stop_after)

    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from starling_lib.reward_model import load_reward_model
    from starling_lib.training import lr_lambda, resume_point, save_checkpoint

    if not cfg.reward_model:
        raise ValueError("reward_model is empty: give the folder of a saved reward model (notebook 03's output)")
    latest, resume_state = resume_point(cfg)

    accelerator = _make_accelerator(cfg)
    set_seed(cfg.seed)
    device = accelerator.device
    with accelerator.main_process_first():  # the SFT warm-up / hub download, once
        policy, tokenizer = _load_policy(cfg, device)
    reward_model = load_reward_model(cfg.reward_model, device=device,
                                     dtype=torch.bfloat16 if device.type == "cuda" else None)
    train_prompts, eval_prompts = load_prompts(cfg, tokenizer)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))   # steps once per training step
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(policy)

    start_step, history, evals = 0, [], []
    if latest is not None:
        accelerator.load_state(str(latest))
        start_step, history, evals = resume_state["step"], resume_state["history"], resume_state["evals"]
        accelerator.print(f"resumed from {latest} at step {start_step}")

    m = cfg.method
    rank, n_proc = accelerator.process_index, accelerator.num_processes
    unit = cfg.samples_per_prompt                     # rows per training unit: a response, or P3O's pair
    units_per_minibatch = cfg.minibatch_size // n_proc // unit
    units_per_micro = cfg.micro_batch_size // unit
    eval_s, eval_details = 0.0, []

    def run_eval(step: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        e = evaluate_policy(unwrapped, tokenizer, reward_model, eval_prompts, **eval_settings(cfg),
                            autocast=accelerator.autocast)
        if not any(r["step"] == step for r in evals):   # a run resumed at its end has this record already
            evals.append({"step": step, **{f"policy/{m}/eval_{k}": v for k, v in e.items()
                                           if k not in ("examples", "rewards")}})
        eval_details.append({"step": step, **e})
        eval_s += time.perf_counter() - t

    if cfg.eval_every and eval_prompts and start_step == 0:
        run_eval(0)

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{m.upper()} rollout batches",
               disable=not (cfg.progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    for step in range(start_step, end_step):
        # ---- 1. rollout: sample, score, and the no-grad forward for old / reference log-probs and values
        b_prompts = step_prompts(step, train_prompts, cfg, rank, n_proc)
        torch.manual_seed(_step_seed(cfg.seed, step, rank))
        with torch.no_grad(), accelerator.autocast():
            batch = generate(unwrapped.model, tokenizer, b_prompts, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, engine=cfg.rollout_engine)
        b_mask = batch.response_mask
        b_scores = reward_model.score(b_prompts, [r.strip() for r in batch.responses]).to(device)   # (B,)
        outs = []
        with torch.no_grad(), accelerator.autocast():
            for mb_rows in _chunks(torch.arange(len(b_prompts)), cfg.micro_batch_size):
                outs.append(unwrapped(batch.input_ids[mb_rows], batch.attention_mask[mb_rows], batch.response_start,
                                      with_ref=True, with_values=m != "p3o", with_entropy=True))
        b_old_logprobs = torch.cat([o["logprobs"] for o in outs])                    # (B, R)
        b_ref_logprobs = torch.cat([o["ref_logprobs"] for o in outs])
        b_entropy = torch.cat([o["entropy"] for o in outs])
        b_kl = kl_penalty(b_old_logprobs, b_ref_logprobs, cfg.kl_estimator) * b_mask   # penalty estimate
        b_kl_report = (kl_penalty(b_old_logprobs, b_ref_logprobs, "k3") * b_mask).sum(-1)  # (B,) per response

        # ---- 2. rewards and advantages; b_train holds what the losses read, one row per response
        b_norm_scores = normalize_scores(b_scores, cfg.score_norm)
        b_train = {"mask": b_mask, "old_logprobs": b_old_logprobs, "ref_logprobs": b_ref_logprobs}
        if m in ("apa", "ppo"):
            b_values = torch.cat([o["values"] for o in outs]) * b_mask
            # PPO folds the KL into the reward; APA's loss anchors to pi_init itself, so its reward has no KL.
            b_rewards = per_token_rewards(b_norm_scores, b_kl, b_mask, cfg.beta if m == "ppo" else 0.0)
            b_advantages, b_returns = gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.gae_lambda)
            if cfg.whiten_advantages:
                b_advantages = masked_whiten(b_advantages, b_mask)
            b_train.update(values=b_values, advantages=b_advantages, returns=b_returns)
        else:
            b_seq_rewards = b_norm_scores - cfg.beta * b_kl.sum(-1)          # (B,) r_i = RM(y_i) - beta KL_i
            # (B,) with each pair's r_1 - r_2 on both of its rows; the loss reads it from the first.
            b_train["reward_diff"] = (b_seq_rewards[0::2] - b_seq_rewards[1::2]).repeat_interleave(2)

        # ---- 3. epochs of minibatch updates; each minibatch is one optimizer step, accumulated over micro-batches
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank))
        b_stats = []
        for _ in range(cfg.epochs_per_batch):
            for mb_units in iterate_minibatches(len(b_prompts) // unit, units_per_minibatch, gen):
                micros = list(_chunks(mb_units, units_per_micro))
                for i, micro_units in enumerate(micros):
                    rows = (micro_units.unsqueeze(1) * unit + torch.arange(unit)).flatten()   # P3O: both of a pair
                    # DDP averages gradients over processes only on the last micro-batch of the minibatch.
                    with contextlib.nullcontext() if i == len(micros) - 1 else accelerator.no_sync(policy):
                        mb_out = policy(batch.input_ids[rows], batch.attention_mask[rows], batch.response_start,
                                        with_values=m != "p3o")
                        loss, stats = method_loss(cfg, mb_out, {k: v[rows] for k, v in b_train.items()})
                        accelerator.backward(loss / len(micros))
                    b_stats.append({k: float(v) for k, v in stats.items()})
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        # ---- 4. metrics: this process's means, then the mean over processes
        local = {"reward_mean": b_scores.mean(),
                 "reward_std": b_scores.std() if len(b_scores) > 1 else b_scores.new_zeros(()),
                 "kl": b_kl_report.mean(), "entropy": masked_mean(b_entropy, b_mask),
                 "response_length": b_mask.sum(-1).float().mean(),
                 "stop_frac": ended_with_stop(batch, tokenizer).float().mean()}
        if m == "ppo":
            local["non_score_reward"] = -cfg.beta * b_kl.sum(-1).mean()
        for k in b_stats[0]:
            local[k] = torch.tensor(sum(s[k] for s in b_stats) / len(b_stats), device=device)
        names = sorted(local)
        g = accelerator.reduce(torch.stack([local[k].float().to(device) for k in names]), reduction="mean")
        record = {"step": step + 1, **{f"policy/{m}/{k}": v for k, v in zip(names, g.tolist())},
                  f"policy/{m}/lr": scheduler.get_last_lr()[0],
                  f"policy/{m}/elapsed_s": time.perf_counter() - t0 - eval_s}
        history.append(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record[f'policy/{m}/reward_mean']:.3f}", kl=f"{record[f'policy/{m}/kl']:.3f}")

        done = step + 1
        if cfg.eval_every and eval_prompts and (done % cfg.eval_every == 0 or done == cfg.steps):
            run_eval(done)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == end_step):
            save_checkpoint(accelerator, cfg, {"step": done, "config": cfg.fingerprint(), "history": history,
                                                "evals": evals})
    bar.close()
    wall_s = time.perf_counter() - t0 - eval_s
    if cfg.eval_every and eval_prompts and end_step == cfg.steps and not any(d["step"] == end_step for d in eval_details):
        run_eval(end_step)   # resumed after the last step: the details of the final evaluation are not in the checkpoint

    policy_dir = None
    if cfg.output_dir and cfg.save_policy and end_step == cfg.steps:
        policy_dir = Path(cfg.output_dir) / "policy"
        if accelerator.is_main_process:
            save_policy(unwrapped.model, tokenizer, policy_dir,
                        {"method": m, "training": cfg.fingerprint(), "steps_done": end_step})
        accelerator.wait_for_everyone()
    return PolicyTrainResult(policy=unwrapped, tokenizer=tokenizer, history=history, evals=evals, wall_s=wall_s,
                             eval_s=eval_s, steps_run=end_step - start_step, config=cfg, policy_dir=policy_dir,
                             extra={"num_processes": n_proc,
                                    "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts),
                                    "responses_generated": (end_step - start_step) * cfg.rollouts_per_step,
                                    "optimizer_steps": (end_step - start_step) * optimizer_steps_per_step(cfg)},
                             eval_details=eval_details)


# --------------------------------------------------------------------------------------------
# bookkeeping for plots and tables


def strip_method(record: dict, method: str) -> dict:
    """{"step": 3, "policy/apa/kl": 0.1} -> {"step": 3, "kl": 0.1} (keys of other methods dropped)."""
    prefix = f"policy/{method}/"
    return {("step" if k == "step" else k[len(prefix):]): v for k, v in record.items()
            if k == "step" or k.startswith(prefix)}


def history_frame(results: dict[str, PolicyTrainResult]):
    """One long table of every method's per-step training metrics: columns method, step, reward_mean, kl, ..."""
    import pandas as pd
    rows = [{"method": name, **strip_method(r, res.config.method)} for name, res in results.items() for r in res.history]
    return pd.DataFrame(rows)


def reward_gain(before: dict, after: dict) -> tuple[float, float]:
    """(mean gain, standard error) in reward from evaluation `before` to `after` of the same prompts.

    Paired by prompt: each prompt's mean reward over its samples, after minus before; the error is
    the standard error of those differences over prompts.
    """
    k = before["samples"]
    b = torch.tensor(before["rewards"]).view(-1, k).mean(1)
    a = torch.tensor(after["rewards"]).view(-1, after["samples"]).mean(1)
    if a.shape != b.shape:
        raise ValueError(f"evaluations of different prompt sets ({len(b)} vs {len(a)} prompts)")
    d = a - b
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0


def summary_table(initial: dict, results: dict[str, PolicyTrainResult]):
    """One row per method: held-out reward of the initial and the tuned policy, the paired gain,
    KL to the initial policy, response length, and the cost (time, responses, optimizer steps)."""
    import pandas as pd
    rows = []
    for name, res in results.items():
        final = res.eval_details[-1]
        gain, se = reward_gain(initial, final)
        rows.append({"method": name, "initial reward": initial["reward_mean"], "final reward": final["reward_mean"],
                     "gain": gain, "gain s.e.": se, "KL to initial": final["kl"],
                     "response length": final["response_length"], "stopped": final["stop_frac"],
                     "train s": res.wall_s, "eval s": res.eval_s,
                     "sequences": res.extra.get("responses_generated", 2 * res.extra.get("num_pairs", 0)),
                     "optimizer steps": res.extra["optimizer_steps"]})
    return pd.DataFrame(rows).set_index("method")


def samples_frame(initial: dict, results: dict[str, PolicyTrainResult], prompts: int = 3):
    """The first sample for the first `prompts` evaluation prompts: the initial policy's and each method's, with rewards."""
    import pandas as pd
    k = initial["samples"]
    rows = []
    for i in range(min(prompts, len(initial["examples"]) // k)):
        first = initial["examples"][i * k]
        rows.append({"prompt": first["prompt"][:80], "policy": "initial", "response": first["response"],
                     "reward": first["reward"]})
        for name, res in results.items():
            e = res.eval_details[-1]["examples"][i * k]
            rows.append({"prompt": first["prompt"][:80], "policy": name, "response": e["response"], "reward": e["reward"]})
    return pd.DataFrame(rows)


def save_policies(run_dir: str | os.PathLike | None, initial_path: str,
                  results: dict[str, PolicyTrainResult]) -> dict[str, Path]:
    """Save every tuned policy, and the initial one when it is a local folder, as from_pretrained
    folders in `policies_dir(run_dir)`, where notebook 05 finds them: policies/<method>, policies/initial.

    An initial policy from the hub (e.g. openchat/openchat_3.5) is not copied: notebook 05 takes
    hub ids directly (its `models` parameter).
    """
    from starling_lib.models import load_model_and_tokenizer

    root = policies_dir(run_dir)
    paths = {}
    if Path(initial_path).is_dir():
        model, tokenizer = load_model_and_tokenizer(initial_path, device="cpu")
        paths["initial"] = save_policy(model, tokenizer, root / "initial", {"method": "initial", "source": initial_path})
    for name, res in results.items():
        paths[name] = save_policy(res.policy.model, res.tokenizer, root / name,
                                  {"method": res.config.method, "training": res.config.fingerprint()})
    return paths


def frontier_frame(results: dict[str, PolicyTrainResult]):
    """The reward-against-KL frontier: per method and evaluation, step, eval reward (and its standard
    error) and eval KL to the initial policy, from the held-out evaluations."""
    import pandas as pd
    rows = []
    for name, res in results.items():
        for e in res.evals:
            s = strip_method(e, res.config.method)
            rows.append({"method": name, "step": s["step"], "reward": s["eval_reward_mean"],
                         "reward_se": s["eval_reward_se"], "kl": s["eval_kl"],
                         "response_length": s["eval_response_length"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# command line: python -m starling_lib.policy CONFIG.yaml [--set key=value ...]


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> PolicyTrainConfig:
    """A PolicyTrainConfig from a YAML file of fields and `key=value` overrides (unknown keys are errors)."""
    from starling_lib.runs import load_dataclass_config
    return load_dataclass_config(PolicyTrainConfig, path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m starling_lib.policy", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML file of PolicyTrainConfig fields, e.g. configs/policy/tiny_cpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    result = train_policy(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.history[-1] if result.history else {}
        print(json.dumps({"method": cfg.method, "steps": cfg.steps, "wall_s": round(result.wall_s, 2),
                          **result.extra, **last, **(result.evals[-1] if result.evals else {})}, sort_keys=True))
        if cfg.output_dir:
            (Path(cfg.output_dir) / "history.json").write_text(
                json.dumps({"history": result.history, "evals": result.evals}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
