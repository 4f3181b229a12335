"""The policy-tuning run's settings and what a run returns: PolicyTrainConfig, PolicyTrainResult.

One config drives every method (APA, PPO, P3O online; DPO offline), so that the four start from
the same initial policy with the same budget of sequences and optimizer steps, and are evaluated
the same way. Each field's docstring gives Starling's own value where it differs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

from starling_lib import tracking
from starling_lib.reward_client import check_server_url, is_reward_server_url
from starling_lib.sampling import ENGINES, SERVING_ENGINES
from starling_lib.training import TrainConfig

METHODS = ("apa", "ppo", "p3o", "dpo")
INITIAL_POLICY = "sft-tiny"           # name of the embedded default's initial policy (see prompts.resolve_policy)


@dataclass
class PolicyTrainConfig(TrainConfig):
    """One policy-tuning run. Every field can be set from a YAML file or `--set key=value`."""

    policy: str = INITIAL_POLICY
    """Initial policy: "sft-tiny" (the tiny model after the cached SFT warm-up, starling_lib.sft),
    a hub id such as "openchat/openchat_3.5", or a local from_pretrained folder."""

    reward_model: str = ""
    """Folder of a reward model saved by notebook 03 / rm_train (`rm_io.load_reward_model`), or the URL
    of one served apart, "http://host:port" (starling_lib.reward_server; the client: reward_client)."""

    method: str = "apa"
    """"apa", "ppo", "p3o" (online, policy.online) or "dpo" (offline, TRL's DPOTrainer, policy.dpo)."""

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
    """Responses sampled per step over all processes. APA/PPO: `responses_per_prompt` per prompt
    (one by default); P3O: two per prompt for half as many prompts, so every method generates the
    same number of responses. Starling: 64."""

    responses_per_prompt: int = 1
    """APA and PPO: responses sampled per prompt in a rollout batch (P3O always samples a pair).
    With more than one, `score_norm="prompt"` can take each prompt's mean score as the baseline.
    Ours; Starling: 1. rollouts_per_step, minibatch_size and micro_batch_size must be multiples of
    it: a prompt's responses are updated together."""

    minibatch_size: int = 4
    """Responses per optimizer step over all processes: ceil(rollouts_per_step / minibatch_size)
    optimizer steps per epoch, the last one on what is left. Neither needs to divide by the number
    of processes (policy.online: each trains on its own rows of a minibatch drawn from the whole
    batch). Starling: 28 (its "batch 28")."""

    micro_batch_size: int = 4
    """Responses per forward/backward on one device; gradient accumulation makes up the minibatch,
    each micro-batch weighted by its share of the minibatch's tokens, so this is a memory setting:
    it does not change the update."""

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
    `generate` on the tiny model), "hf" (`model.generate`), "auto" (fast where supported), "vllm"
    (vLLM in this process, sent the trained layers after each step) or "vllm-server" (a vLLM server
    at $STARLING_VLLM_URL); see starling_lib.engines. The losses are computed from the tokens either way."""

    cache_trunk: bool = True
    """Compute the frozen trunk's output (embeddings and the layers below `unfrozen_layers`) once
    per rollout batch and start every update from it, instead of a full forward per micro-batch
    and epoch: the same losses (to float rounding) for much less work when few layers train (with
    2 of SmolLM2's 30 layers, the update's forward is about a fifteenth). Costs one (rollout batch,
    tokens, hidden) tensor of memory: about 1 GB for Starling's 64 x 2048 tokens at 7B width in bf16."""

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
    the tiny model has 4 layers. With `lora_r`, the top layers that get adapters; -1 all."""

    lora_r: int = 0
    """Rank of LoRA adapters (peft) on every linear layer of the top `unfrozen_layers` layers, which
    then train instead of the layers themselves; the reference is the same weights with the
    adapters off (starling_lib.lora_policy). 0: no LoRA. Online methods only; no trunk cache, and
    not with the vLLM engines. Ours: Starling trained the top 4 layers."""

    lora_alpha: float = 0.0
    """LoRA's scale numerator (the update is alpha / r x B A); 0 means 2 x lora_r."""

    score_norm: str = "center"
    """What the RM scores go through before they become rewards: "none"; "center" (subtract the
    rollout batch's mean: a baseline, so the critic that starts at zero is not off by the reward
    model's offset); "whiten" (also divide by the batch's standard deviation); "prompt" (subtract
    the mean of the prompt's own responses, `responses_per_prompt` of them: the baseline of RLOO
    and GRPO, which removes how hard the prompt is from the advantage). Ours; P3O only sees
    score differences within a pair, so none of them changes anything there."""

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
    """P3O clipping: "joint", the Starling authors' form (losses.p3o_authors_loss: the pair's
    log-ratio gap clipped to within clip_eps of the rollout's, weighted by clip(rho_1 rho_2), the
    KL in the reward difference recomputed each minibatch); "ratio" (the ratio rho_1 / rho_2
    clipped to 1 -+ clip_eps, the KL fixed at rollout); "separate" (a clipped ratio per response)."""

    p3o_ratio_clip: float = 10.0
    """P3O "joint": the importance weight rho_1 rho_2 is clipped to [1 / this, this] (the authors' 10)."""

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

    report_to: str = "tensorboard"
    """Where the run's metrics go as it trains (starling_lib.tracking): "tensorboard" (event files
    under output_dir/tracking/), "wandb", "mlflow" or any tracker accelerate knows (comma-separated
    for several), "none". Needs output_dir; configure W&B or MLflow as those tools are."""

    # Fields that do not change the trained weights: a checkpoint may be resumed under new values.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = (
        "output_dir", "checkpoint_every", "keep_checkpoints", "resume", "save_policy", "progress", "report_to",
        "eval_every", "eval_prompts", "eval_samples", "eval_batch_size")

    def __post_init__(self):
        tracking.check_report_to(self.report_to)
        if is_reward_server_url(self.reward_model):
            check_server_url(self.reward_model)   # a ValueError saying what is wrong with the URL
        self.check_choices(method=METHODS, kl_estimator=("k1", "k3"), score_norm=("none", "center", "whiten", "prompt"),
                           rollout_engine=ENGINES, p3o_variant=("joint", "ratio", "separate"))
        self.check_ranges(rollouts_per_step=(1, True), minibatch_size=(1, True), epochs_per_batch=(1, True),
                          responses_per_prompt=(1, True),
                          max_new_tokens=(1, True), max_prompt_tokens=(1, True), eval_samples=(1, True),
                          eval_batch_size=(1, True), lam=(0.0, False), beta=(0.0, True), clip_eps=(0.0, False),
                          dpo_beta=(0.0, False), temperature=(0.0, True), p3o_ratio_clip=(1.0, True))
        self.check_ranges(lora_r=(0, True), lora_alpha=(0.0, True))
        if self.lora_r:
            if self.method == "dpo":
                raise ValueError("lora_r: LoRA is implemented for the online methods (apa, ppo, p3o), not for dpo")
            if self.rollout_engine in SERVING_ENGINES:
                raise ValueError(f"lora_r: rollout_engine {self.rollout_engine!r} would be sent the base weights "
                                 "without the adapters; use 'auto' (the KV-cache sampler runs them) or 'hf'")
            if self.unfrozen_layers == 0 or self.unfrozen_layers < -1:
                raise ValueError(f"lora_r: unfrozen_layers is the top layers that get adapters, -1 all; got "
                                 f"{self.unfrozen_layers}")
        elif self.unfrozen_layers < 1:
            raise ValueError(f"unfrozen_layers must be at least 1 (-1, all layers, only with lora_r); got "
                             f"{self.unfrozen_layers}")
        if not 0 < self.micro_batch_size <= self.minibatch_size <= self.rollouts_per_step:
            raise ValueError(f"need micro_batch_size <= minibatch_size <= rollouts_per_step, got {self.micro_batch_size}, "
                             f"{self.minibatch_size}, {self.rollouts_per_step}")
        if self.method == "p3o" and (self.rollouts_per_step % 2 or self.minibatch_size % 2 or self.micro_batch_size % 2):
            raise ValueError("P3O trains on pairs of responses: rollouts_per_step, minibatch_size and "
                             "micro_batch_size must be even")
        k = self.samples_per_prompt
        if k > 1 and self.method != "p3o" and (self.rollouts_per_step % k or self.minibatch_size % k
                                               or self.micro_batch_size % k):
            raise ValueError(f"responses_per_prompt={k}: rollouts_per_step={self.rollouts_per_step}, minibatch_size="
                             f"{self.minibatch_size} and micro_batch_size={self.micro_batch_size} must be multiples of "
                             "it (a prompt's responses are updated together)")
        if self.score_norm == "prompt" and k < 2:
            raise ValueError(f'score_norm="prompt" takes each prompt\'s mean score as the baseline: it needs '
                             f"responses_per_prompt >= 2 (got {self.responses_per_prompt}) or method p3o")

    @property
    def samples_per_prompt(self) -> int:
        """Responses per prompt in a rollout batch: 2 for P3O (a pair), else `responses_per_prompt`."""
        return 2 if self.method == "p3o" else self.responses_per_prompt

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per training step: epochs x minibatches per rollout batch (the last may be partial)."""
        return self.epochs_per_batch * math.ceil(self.rollouts_per_step / self.minibatch_size)


@dataclass
class PolicyTrainResult:
    """What a policy-tuning run returns (online or DPO)."""

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


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> PolicyTrainConfig:
    """A PolicyTrainConfig from a YAML file of fields and `key=value` overrides (unknown keys are errors)."""
    from starling_lib.runs import load_dataclass_config
    return load_dataclass_config(PolicyTrainConfig, path, overrides)


def parse_method_lr(spec: str) -> dict[str, float]:
    """Per-method learning rates that replace `lr` for those methods: "ppo:1e-3, p3o:1e-3" ->
    {"ppo": 0.001, "p3o": 0.001}; "" -> {}. A ValueError names an unknown method, a repeated one
    or a value that is not a positive number.

    The losses move the policy at different speeds per unit of learning rate (APA regresses the
    log-ratio onto advantage / lam; PPO and P3O take clipped steps on whitened advantages), so a
    comparison at one learning rate can be a comparison of step sizes; the APA paper tuned each."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = (s.strip() for s in part.partition(":"))
        if not sep or name not in METHODS:
            raise ValueError(f"method_lr: {part!r} is not method:rate with a method from {', '.join(METHODS)}")
        if name in rates:
            raise ValueError(f"method_lr: {name} is given twice in {spec!r}")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not rate > 0:
            raise ValueError(f"method_lr: the rate of {name} must be a positive number, got {value!r}")
        rates[name] = rate
    return rates


def method_config(base: PolicyTrainConfig, method: str, method_lr: str = "", **changes) -> PolicyTrainConfig:
    """`base` for `method`: its own learning rate where `method_lr` (`parse_method_lr`) names one,
    then `changes` (such as output_dir)."""
    lr = parse_method_lr(method_lr).get(method, base.lr)
    return replace(base, method=method, lr=lr, **changes)
