"""The online policy-tuning loop (APA, PPO, P3O): rollout, score, targets, minibatch updates.

Starling-LM-7B-alpha is Openchat-3.5 tuned online against Starling-RM-7B-alpha with APA, only
its last 4 layers unfrozen. No RLHF library ships APA or P3O (and TRL 1.16 no longer ships PPO),
so this module is the trainer, written top to bottom; what the methods do differently is in
policy.methods, one block each:

  for each step:
      take the step's prompts (a function of the seed and the step; policy.prompts)
      sample one response per prompt (P3O: two per prompt, half the prompts), score each with the RM
      one no-grad forward of the SharedTrunkPolicy: log-probs under the policy (the "old" ones of
          PPO's ratio) and under the reference (the initial policy), values, entropy; it and every
          update below start from the frozen trunk's output, which the sampler kept while
          generating (or, with model.generate, this pass computes once)
      per-token KL to the reference; the method's targets (advantages, or P3O's reward difference)
      for each of `epochs_per_batch` epochs, for each shuffled minibatch (one optimizer step,
      its gradient accumulated over micro-batches): the method's loss, through the top layers only
      log reward, KL to the initial policy, entropy, response length, clip fraction, value loss, gradient norm,
          and the seconds each phase took (time_generate_s, time_score_s, time_forward_s, time_update_s)

In a notebook (one device):

    result = train_policy(PolicyTrainConfig(method="apa", reward_model=str(rm_dir), eval_every=8))

On many GPUs (accelerate; DDP is the natural fit, as only the top layers train):

    accelerate launch --config_file configs/accelerate/ddp.yaml -m starling_lib.policy configs/policy/starling_apa_7b.yaml

The batch sizes are global at any world size: a step's prompts are shared out among the processes
(the first few take one more when they do not divide: 64 rollouts on 7 GPUs are 10 + 6 x 9), the
minibatches are drawn from the whole batch by a shuffle every process makes alike, and each
process trains on its own rows of a minibatch, weighted by their share of the minibatch's response
tokens (P3O: pairs). Score baselines and advantage whitening use the whole batch's statistics.
So the update is the mean over the global minibatch, as on one process, whatever the world size
and micro_batch_size (tests/test_policy.py compares 1 and 3 processes).

Checkpoints (`checkpoint_every`) hold the model, optimizer, scheduler and RNG states
(`accelerator.save_state`, training.save_checkpoint); the prompts and the sampling seed of a step
are functions of (seed, step), so a resumed run ends with the same weights as an uninterrupted one.

Departures from the papers and Starling (all documented in PolicyTrainConfig too):
- the reference shares the trunk with the policy (rollout.SharedTrunkPolicy), and the value head
  sits on the policy's last hidden state (PPO's critic shares the trainable layers);
- advantages are whitened per rollout batch (over every process's share of it);
- the reward model scores each response as a finished turn (its chat format's end of turn
  appended) even when it was cut at max_new_tokens; no penalty for a missing end of turn;
- prompts longer than `max_prompt_tokens` are skipped, not truncated;
- dropout is off throughout (the policy stays in eval mode), as in TRL;
- reported KL is the k3 estimator summed over a response's tokens (non-negative, unbiased);
  the penalty uses `kl_estimator` (k1 by default, as Ziegler et al. and TRL).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from starling_lib import engines, tracking
from starling_lib.lora_policy import LoraPolicy
from starling_lib.losses import kl_penalty, masked_mean
from starling_lib.models import load_model_and_tokenizer
from starling_lib.policy.config import PolicyTrainConfig, PolicyTrainResult
from starling_lib.policy.evaluate import ended_with_stop, eval_settings, evaluate_policy
from starling_lib.policy.io import save_policy
from starling_lib.policy.methods import ONLINE_METHODS, normalize_scores
from starling_lib.policy.prompts import load_prompts, process_units, resolve_policy, step_prompts
from starling_lib.reward_client import RemoteRewardModel, RewardServerError, load_reward_scorer
from starling_lib.rollout import SharedTrunkPolicy, generate, iterate_minibatches
from starling_lib.training import (checkpoint_damage, checkpoints, lr_lambda, make_accelerator, resume_point,
                                   save_checkpoint)


def check_strategy(accelerator) -> None:
    """Refuse FSDP and DeepSpeed for policy tuning, with the reason, before a 7B model is loaded.

    FSDP: rollouts and evaluation call the policy's inner causal LM (`model.generate`, or the
    sampler), outside the forward of the wrapping SharedTrunkPolicy. Under FSDP the embeddings,
    final norm and lm_head belong to that root unit and stay sharded there, so the first rollout
    would fail with "mixed torch.Tensor and DTensor".
    DeepSpeed: its engine fixes the micro-batches per optimizer step when it starts (its
    gradient_accumulation_steps), while this loop takes a minibatch's rows where they were sampled,
    so a process runs as many micro-batches as it holds rows of that minibatch, and an epoch's
    last minibatch is smaller; ZeRO would need equal, fixed counts on every process.
    DDP needs no sharding here: with 4 of 32 layers trained (or LoRA adapters), a 7B policy, its
    reference layers and the optimizer state fit on one 80 GB GPU per process.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("policy tuning does not run under FSDP (rollouts call the inner model, whose "
                         "embeddings and lm_head the root FSDP unit keeps sharded); launch it with "
                         "configs/accelerate/ddp.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("policy tuning does not run under DeepSpeed (its engine fixes the micro-batches per "
                         "optimizer step, while each process here trains on however many rows of a minibatch it "
                         "sampled); launch it with configs/accelerate/ddp.yaml: with the top layers or LoRA "
                         "adapters trained, a 7B policy fits one GPU per process")


def check_world_size(cfg: PolicyTrainConfig, num_processes: int) -> None:
    """Every process needs at least one prompt of each step; sizes need not divide (see the module doc)."""
    units = cfg.rollouts_per_step // cfg.samples_per_prompt
    if units < num_processes:
        each = f" ({cfg.samples_per_prompt} responses each)" if cfg.samples_per_prompt > 1 else ""
        raise ValueError(f"rollouts_per_step={cfg.rollouts_per_step} is {units} prompt(s) a step{each}, fewer than the "
                         f"{num_processes} processes: each process samples at least one. Raise rollouts_per_step to "
                         f"{num_processes * cfg.samples_per_prompt} or more, or launch at most {units} processes.")


def policy_accelerator(cfg: PolicyTrainConfig):
    """training.make_accelerator, then the checks of this trainer: DDP (or one process), a prompt for every process."""
    accelerator = make_accelerator(cfg)
    check_strategy(accelerator)
    check_world_size(cfg, accelerator.num_processes)
    return accelerator


def load_policy(cfg: PolicyTrainConfig, device: torch.device) -> tuple[SharedTrunkPolicy | LoraPolicy, object]:
    """(SharedTrunkPolicy, tokenizer): frozen weights in the device's default dtype (bf16 on a GPU),
    the trained layers and the value head in float32 (the optimizer's master weights). With
    `lora_r`, a LoraPolicy: the adapters (float32, peft's default) train instead of the layers."""
    model, tokenizer = load_model_and_tokenizer(resolve_policy(cfg.policy), device=device)
    critic = ONLINE_METHODS[cfg.method].critic
    if cfg.lora_r:
        with torch.random.fork_rng(devices=[]):   # the adapters' A draws random numbers: keep the run's own
            policy = LoraPolicy(model, cfg.lora_r, cfg.lora_alpha or None, cfg.unfrozen_layers, value_head=critic)
        return policy.eval(), tokenizer
    with torch.random.fork_rng(devices=[]):
        policy = SharedTrunkPolicy(model, cfg.unfrozen_layers, value_head=critic)
    for layer in policy.model.model.layers[policy.split:]:
        layer.float()
    return policy.eval(), tokenizer


def _chunks(indices: torch.Tensor, size: int):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def _rows(units: torch.Tensor, unit: int) -> torch.Tensor:
    """Row indices of training units (a prompt's `unit` consecutive responses: P3O's pair)."""
    return (units.unsqueeze(1) * unit + torch.arange(unit)).flatten()


def local_minibatches(n_units: int, units_per_minibatch: int, epochs: int, mine: range,
                      generator: torch.Generator) -> list[torch.Tensor]:
    """Each minibatch of a step's updates (all epochs), as this process's units of it (0-based in
    its own rows; possibly none). The shuffle is of the global batch, the same on every process."""
    out = []
    for _ in range(epochs):
        for g_units in iterate_minibatches(n_units, units_per_minibatch, generator):   # global unit positions
            out.append(g_units[(g_units >= mine.start) & (g_units < mine.stop)] - mine.start)
    return out


def _weighted_means(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], total, device) -> dict[str, float]:
    """{name: (local mean, local weight)} -> {name: the mean over every process}, in one collective."""
    names = sorted(pairs)
    values = torch.stack([torch.stack([torch.as_tensor(m, device=device).float() * torch.as_tensor(w, device=device),
                                       torch.as_tensor(w, device=device).float()]) for m, w in
                          (pairs[k] for k in names)])                                   # (metrics, 2)
    sums = total(values)
    return {k: s / w if w > 0 else 0.0 for k, (s, w) in zip(names, sums.tolist())}


class _PhaseClock:
    """Wall seconds of each phase of a step (this process's): where a step's time goes.

    On a GPU each lap waits for the kernels queued so far (four waits a step, next to the
    rollout's own), so a phase is charged its own kernels, not the previous phase's.
    """

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.laps: dict[str, float] = {}
        self.sync()
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.laps[name] = now - self.t
        self.t = now


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Sampling of step `step` on process `rank`: reproducible after a resume, different per process.
    return (seed * 1_000_003 + step * 7919 + rank) % (2**31 - 1)


def _score_rollouts(reward_model, prompts, responses, accelerator, cfg: PolicyTrainConfig, step: int,
                    history: list, evals: list) -> torch.Tensor:
    """The reward model's scores (B,) of this process's rollouts at `step` (0-based, not yet done).

    A reward server (reward_client) that stays down through the client's retries stops the run on
    every process together (one process stopping alone would leave the others waiting in the next
    collective), after saving the last completed step as a checkpoint when output_dir is set and
    it has none, so that running the same config again resumes there once the server is back.
    """
    if not isinstance(reward_model, RemoteRewardModel):
        return reward_model.score(prompts, responses)
    scores, error = None, None
    try:
        scores = reward_model.score(prompts, responses)
    except RewardServerError as e:
        error = e
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), reduction="sum")
    if not failed.item():
        return scores
    intact = [p for p in checkpoints(cfg.output_dir) if checkpoint_damage(p) is None] if cfg.output_dir else []
    if cfg.output_dir and step > 0 and not any(p.name == f"step-{step:06d}" for p in intact):
        # Nothing of this step has changed the weights yet: the checkpoint is the one the end of the last step would be.
        save_checkpoint(accelerator, cfg, {"step": step, "config": cfg.fingerprint(), "history": history,
                                           "evals": evals})
        intact = [p for p in checkpoints(cfg.output_dir) if checkpoint_damage(p) is None]
    resume = (f"running the same config again (resume=True) resumes from step {int(intact[-1].name[5:])} ({intact[-1]})"
              if intact else "there is no checkpoint (no output_dir, or no step done): running again starts over")
    reason = error or "another process could not reach the reward server"
    raise RewardServerError(f"{reason}\nThe policy run stopped at step {step + 1} of {cfg.steps}; {resume} once the "
                            "reward server answers again.") from error


def train_online(cfg: PolicyTrainConfig, stop_after: int | None = None, reward_model=None,
                 initial_eval: dict | None = None) -> PolicyTrainResult:
    """Tune the initial policy against the reward model with APA, PPO or P3O as `cfg` says;
    resume from a checkpoint if there is one.

    stop_after: end this run after that many steps in total (as if interrupted), for the resume
        test and time-boxed jobs; a later call with the same config continues.
    reward_model: a scorer to use instead of loading `cfg.reward_model`: anything with
        `score(prompts, responses, batch_size=...) -> (B,) tensor`, such as a rule-based reward
        (it is not part of the checkpoint fingerprint: resume with the same one).
    initial_eval: the initial policy's evaluation with this config's settings (`evaluate_initial`),
        taken as the step-0 evaluation instead of computing it again.
    """
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    if cfg.method not in ONLINE_METHODS:
        raise ValueError(f"train_online runs {sorted(ONLINE_METHODS)}, not {cfg.method!r} (see policy.train_policy)")
    if not cfg.reward_model and reward_model is None:
        raise ValueError("reward_model is empty: give the folder of a saved reward model (notebook 03's output)")
    method = cfg.method
    algo = ONLINE_METHODS[method]
    latest, resume_state = resume_point(cfg)

    accelerator = policy_accelerator(cfg)
    set_seed(cfg.seed)
    device = accelerator.device
    with accelerator.main_process_first():  # the SFT warm-up / hub download, once
        policy, tokenizer = load_policy(cfg, device)
    if reward_model is None:
        reward_model = load_reward_scorer(cfg.reward_model, device=device,
                                          dtype=torch.bfloat16 if device.type == "cuda" else None)
    train_prompts, eval_prompts = load_prompts(cfg, tokenizer)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))   # steps once per training step
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(policy)
    cache_trunk = cfg.cache_trunk and unwrapped.split is not None   # a LoRA policy has no frozen trunk

    start_step, history, evals = 0, [], []
    if latest is not None:
        accelerator.load_state(str(latest))
        start_step, history, evals = resume_state["step"], resume_state["history"], resume_state["evals"]
        accelerator.print(f"resumed from {latest} at step {start_step}")

    tracking.start(accelerator, f"policy_{method}", cfg.fingerprint())   # TensorBoard etc., as cfg.report_to says
    rank, n_proc = accelerator.process_index, accelerator.num_processes
    unit = cfg.samples_per_prompt                     # rows per training unit: a prompt's responses (P3O: its pair)
    n_units = cfg.rollouts_per_step // unit           # a step's units over all processes
    mine = process_units(n_units, rank, n_proc)       # the ones this process samples and trains on
    units_per_minibatch = cfg.minibatch_size // unit  # global, as the recipe says
    units_per_micro = cfg.micro_batch_size // unit

    def total(t: torch.Tensor) -> torch.Tensor:       # the sum over processes
        return accelerator.reduce(t, reduction="sum") if n_proc > 1 else t
    eval_s, eval_details = 0.0, []

    def run_eval(step: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        if step == 0 and initial_eval is not None:
            e = initial_eval                # the policy is still the initial one
        else:
            e = evaluate_policy(unwrapped, tokenizer, reward_model, eval_prompts, **eval_settings(cfg),
                                autocast=accelerator.autocast, shard=(rank, n_proc), gather=gather_object)
        if not any(r["step"] == step for r in evals):   # a run resumed at its end has this record already
            evals.append({"step": step, **{f"policy/{method}/eval_{k}": v for k, v in e.items()
                                           if k not in ("examples", "rewards")}})
            tracking.log(accelerator, evals[-1], step)
            tracking.log_samples(accelerator, f"policy/{method}/eval_samples", e["examples"], step)
        eval_details.append({"step": step, **e})
        eval_s += time.perf_counter() - t

    if cfg.eval_every and eval_prompts and start_step == 0:
        run_eval(0)

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{method.upper()} rollout batches",
               disable=not (cfg.progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    pushed: list[str] = []   # the parameter names pushed to a serving engine after each step
    for step in range(start_step, end_step):
        clock = _PhaseClock(device)
        # ---- 1. rollout: sample, score, and the no-grad forward for old / reference log-probs and values
        b_prompts = step_prompts(step, train_prompts, cfg, rank, n_proc)
        torch.manual_seed(_step_seed(cfg.seed, step, rank))
        with torch.no_grad(), accelerator.autocast():
            batch = generate(unwrapped.model, tokenizer, b_prompts, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, engine=cfg.rollout_engine,
                             keep_trunk=unwrapped.split if cache_trunk else None)
        engines.sleep(unwrapped.model)   # a colocated vLLM engine frees its GPU memory for the update (CUDA only)
        clock.lap("generate")
        b_mask = batch.response_mask
        b_scores = _score_rollouts(reward_model, b_prompts, [r.strip() for r in batch.responses], accelerator, cfg,
                                   step, history, evals).to(device)   # (B,)
        clock.lap("score")
        # The frozen trunk's output (B, T, H) is the same in this pass and every update below: the
        # sampler kept it while generating (batch.trunk), or this pass computes it once (the hf engine).
        outs, sampled_trunk = [], batch.trunk if cache_trunk else None
        with torch.no_grad(), accelerator.autocast():
            for mb_rows in _chunks(torch.arange(len(b_prompts)), cfg.micro_batch_size):
                outs.append(unwrapped(batch.input_ids[mb_rows], batch.attention_mask[mb_rows], batch.response_start,
                                      with_ref=True, with_values=algo.critic, with_entropy=True,
                                      return_trunk=cache_trunk and sampled_trunk is None,
                                      trunk=None if sampled_trunk is None else sampled_trunk[mb_rows]))
        b_trunk = None if not cache_trunk else (
            sampled_trunk if sampled_trunk is not None else torch.cat([o["trunk"] for o in outs]))
        b_old_logprobs = torch.cat([o["logprobs"] for o in outs])                    # (B, R)
        b_ref_logprobs = torch.cat([o["ref_logprobs"] for o in outs])
        b_entropy = torch.cat([o["entropy"] for o in outs])
        b_kl = kl_penalty(b_old_logprobs, b_ref_logprobs, cfg.kl_estimator) * b_mask   # penalty estimate
        b_kl_report = (kl_penalty(b_old_logprobs, b_ref_logprobs, "k3") * b_mask).sum(-1)  # (B,) per response

        # ---- 2. the method's targets; b holds what the losses read, one row per response
        b = {"mask": b_mask, "old_logprobs": b_old_logprobs, "ref_logprobs": b_ref_logprobs, "kl": b_kl,
             "scores": normalize_scores(b_scores, cfg.score_norm, cfg.samples_per_prompt, total)}
        if algo.critic:
            b["values"] = torch.cat([o["values"] for o in outs]) * b_mask
        b_targets, b_target_stats = algo.targets(cfg, b, total)
        b.update(b_targets)
        clock.lap("forward")

        # ---- 3. epochs of minibatch updates; each minibatch is one optimizer step, accumulated over
        # micro-batches. A minibatch is drawn from the global batch (the same shuffle on every process);
        # each process trains on its own units of it, each micro-batch weighted by its share of the whole
        # minibatch's weight (response tokens; P3O: pairs), so the gradient DDP averages is the minibatch's.
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 0))
        mb_local = local_minibatches(n_units, units_per_minibatch, cfg.epochs_per_batch, mine, gen)
        b_unit_weight = algo.row_weight(b).view(-1, unit).sum(1)                        # (units,)
        mb_weights = total(torch.stack([b_unit_weight[u].sum() for u in mb_local]))     # (minibatches,), global
        stat_sums, stat_weight, grad_norms = {}, 0.0, []
        for mb_units, mb_weight in zip(mb_local, mb_weights.tolist()):
            # None: no unit of this minibatch is here; a zero-weight pass still joins DDP's gradient average.
            micros = list(_chunks(mb_units, units_per_micro)) or [None]
            for i, micro_units in enumerate(micros):
                rows = _rows(torch.zeros(1, dtype=torch.long) if micro_units is None else micro_units, unit)
                weight = 0.0 if micro_units is None else b_unit_weight[micro_units].sum().item()
                # DDP averages gradients over processes only on the last micro-batch of the minibatch.
                with contextlib.nullcontext() if i == len(micros) - 1 else accelerator.no_sync(policy):
                    mb_out = policy(batch.input_ids[rows], batch.attention_mask[rows], batch.response_start,
                                    with_values=algo.critic, trunk=b_trunk[rows] if cache_trunk else None)
                    loss, stats = algo.loss(cfg, mb_out, {k: v[rows] for k, v in b.items()})
                    share = weight / mb_weight if mb_weight > 0 else 0.0
                    accelerator.backward(loss * (share * n_proc))   # x n_proc: DDP divides the sum by it
                if weight > 0:
                    for k, v in stats.items():
                        stat_sums[k] = stat_sums.get(k, 0.0) + float(v) * weight
                    stat_weight += weight
            # the minibatch's gradient norm before clipping (inf: measure, do not clip); DeepSpeed clips itself
            norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0
                                               else float("inf"))
            if norm is not None:
                grad_norms.append(float(norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        pushed = engines.sync_weights(unwrapped.model) or pushed   # vllm engines: the trained layers (hf: none)
        clock.lap("update")

        # ---- 4. metrics of the whole batch: each a mean over every process's rows (or tokens, or the
        # update's weight), the same at any world size
        n_rows, n_tokens = float(len(b_scores)), b_mask.sum()
        local = {"reward_mean": (b_scores.mean(), n_rows), "reward_sq": ((b_scores ** 2).mean(), n_rows),
                 "kl": (b_kl_report.mean(), n_rows), "entropy": (masked_mean(b_entropy, b_mask), n_tokens),
                 "response_length": (b_mask.sum(-1).float().mean(), n_rows),
                 "stop_frac": (ended_with_stop(batch, tokenizer).float().mean(), n_rows),
                 **{k: (v, n_rows) for k, v in b_target_stats.items()},
                 **{k: (v / max(stat_weight, 1e-12), stat_weight) for k, v in stat_sums.items()},
                 **({"grad_norm": (sum(grad_norms) / len(grad_norms), 1.0)} if grad_norms else {})}
        g = _weighted_means(local, total, device)
        n_all = cfg.rollouts_per_step                                                   # rows over all processes
        g["reward_std"] = (max(g.pop("reward_sq") - g["reward_mean"] ** 2, 0.0) * n_all / max(n_all - 1, 1)) ** 0.5
        record = {"step": step + 1, **{f"policy/{method}/{k}": v for k, v in sorted(g.items())},
                  f"policy/{method}/lr": scheduler.get_last_lr()[0],
                  f"policy/{method}/elapsed_s": time.perf_counter() - t0 - eval_s,
                  **{f"policy/{method}/time_{k}_s": v for k, v in clock.laps.items()}}
        history.append(record)
        tracking.log(accelerator, record, record["step"])
        bar.update(1)
        bar.set_postfix(reward=f"{record[f'policy/{method}/reward_mean']:.3f}", kl=f"{record[f'policy/{method}/kl']:.3f}")

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
            save_policy(unwrapped.merged() if cfg.lora_r else unwrapped.model, tokenizer, policy_dir,
                        {"method": method, "training": cfg.fingerprint(), "steps_done": end_step})
        accelerator.wait_for_everyone()
    tracking.end(accelerator)
    engines.release(unwrapped.model)   # a later generation with this model starts a fresh engine
    return PolicyTrainResult(policy=unwrapped, tokenizer=tokenizer, history=history, evals=evals, wall_s=wall_s,
                             eval_s=eval_s, steps_run=end_step - start_step, config=cfg, policy_dir=policy_dir,
                             extra={"num_processes": n_proc,
                                    "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts),
                                    "responses_generated": (end_step - start_step) * cfg.rollouts_per_step,
                                    "optimizer_steps": (end_step - start_step) * cfg.optimizer_steps_per_step,
                                    **({"engine_pushed_parameters": pushed} if pushed else {})},
                             eval_details=eval_details)
