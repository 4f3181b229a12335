"""Offline DPO on Nectar pairs through TRL's DPOTrainer, budgeted and evaluated like the online methods.

The Starling authors report that DPO on Nectar gave no gain over the initial model; notebook 04
runs it beside APA, PPO and P3O from the same initial policy so the claim can be looked at:

    result = train_dpo(PolicyTrainConfig(method="dpo", reward_model=str(rm_dir), eval_every=8))

The same `PolicyTrainConfig` as the online trainer, read as follows:
- data: every (chosen, rejected) pair of each training prompt's ranking (`data.to_pairs`, 21 per
  prompt), prompts longer than `max_prompt_tokens` skipped, a seeded random subset of
  steps x rollouts_per_step / 2 pairs, i.e. as many sequences as the online methods generate;
- optimisation: `epochs_per_batch` epochs over them, minibatch_size / 2 pairs per optimizer step
  (micro_batch_size / 2 per forward, the rest by gradient accumulation), on as many sequences per
  step as the online methods; same lr, schedule, gradient clipping and trainable layers (the top
  `unfrozen_layers`; the rest frozen). It makes as many optimizer steps as the online methods only
  when the training prompts that fit hold steps x rollouts_per_step / 2 pairs and minibatch_size
  divides rollouts_per_step; otherwise fewer (at the 7B recipe's sizes 45,716 against 60,000).
  `result.extra["optimizer_steps"]` records the count, and notebook 04's table prints it;
- `dpo_beta` is DPO's beta; sequences are cut to `dpo_max_length` tokens (TRL's keep_start);
- the reference is the initial policy: its log-probs of every pair are computed once, before
  training, from the policy while it still is the initial one (TRL's precompute_ref_log_probs), not
  in every epoch by a second copy of the model (TRL's default), which is never loaded;
- evaluation: the trained policy is wrapped with the initial policy as its reference
  (`evaluate.policy_with_reference`) and evaluated by `evaluate.evaluate_policy` on the same held-out
  prompts with the same seed, so its reward and KL compare like with like with the online methods.
  Evaluations happen before and after training only (TRL owns the loop).

Tracking: TRL's own `report_to` (cfg.report_to), TensorBoard files in output_dir/tracking/policy_dpo
under TRL's metric names (loss, rewards/margins, ...), not the online methods' policy/<method>/ keys.
Checkpoints: with `checkpoint_every` and an `output_dir`, TRL's own checkpoints (output_dir/checkpoints)
and `resume_from_checkpoint`; `stop_after` is not supported here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from starling_lib import tracking
from starling_lib.data import to_pairs, to_trl_preference
from starling_lib.models import load_model_and_tokenizer, train_top_layers
from starling_lib.policy.config import PolicyTrainConfig, PolicyTrainResult
from starling_lib.policy.evaluate import eval_settings, evaluate_policy, policy_with_reference
from starling_lib.policy.io import save_policy
from starling_lib.policy.prompts import load_prompts, nectar_split, prompt_fits, resolve_policy
from starling_lib.reward_client import load_reward_scorer
from starling_lib.training import mixed_precision


def dpo_dataset(cfg: PolicyTrainConfig, tokenizer):
    """TRL's conversational preference rows (prompt / chosen / rejected messages) for `cfg`'s budget."""
    import numpy as np

    train = nectar_split(cfg)["train"]
    fits = prompt_fits(tokenizer, list(train["prompt"]), cfg.max_prompt_tokens)
    pairs = to_pairs(train.select([i for i, ok in enumerate(fits) if ok]))
    wanted = cfg.steps * cfg.rollouts_per_step // 2
    rng = np.random.default_rng([cfg.seed, 4])
    # Without replacement while the pairs last; a budget beyond them repeats pairs in a fresh order.
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-wanted // len(pairs)))])[:wanted]
    return to_trl_preference(pairs.select(order.tolist()))


def dpo_batch_split(cfg: PolicyTrainConfig, num_processes: int) -> tuple[int, int]:
    """(pairs per micro-batch, gradient accumulation steps) that make an optimizer step of
    minibatch_size // 2 pairs over `num_processes` processes: TRL's DPOTrainer takes the same whole
    micro-batches on every process (per_device_train_batch_size x accumulation x processes).
    A ValueError names the numbers when they do not split."""
    pairs_per_micro, pairs = max(1, cfg.micro_batch_size // 2), cfg.minibatch_size // 2
    if pairs % (num_processes * pairs_per_micro):
        raise ValueError(f"DPO: minibatch_size={cfg.minibatch_size} is {pairs} pairs per optimizer step, which must split "
                         f"into {num_processes} process(es) x whole micro-batches of {pairs_per_micro} pair(s) "
                         f"(micro_batch_size={cfg.micro_batch_size}): TRL's DPOTrainer gives every process the same")
    return pairs_per_micro, pairs // (num_processes * pairs_per_micro)


def train_dpo(cfg: PolicyTrainConfig, stop_after: int | None = None, reward_model=None,
              initial_eval: dict | None = None) -> PolicyTrainResult:
    """DPO with TRL from the initial policy, then the same held-out evaluation as the online methods
    (initial_eval: the initial policy's, used as the step-0 evaluation, see train_policy)."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    if stop_after is not None:
        raise NotImplementedError("stop_after is not supported for DPO (TRL owns the loop)")
    if not cfg.reward_model and reward_model is None:
        raise ValueError("reward_model is empty: DPO does not train on it, but it is evaluated with it")
    initial_path = resolve_policy(cfg.policy)
    precision = mixed_precision(cfg)
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    # float32 master weights; the Trainer's autocast runs the forward in bf16 when asked.
    model, tokenizer = load_model_and_tokenizer(initial_path, device="cpu", dtype=torch.float32)
    train_top_layers(model, cfg.unfrozen_layers)

    train = dpo_dataset(cfg, tokenizer)
    from accelerate import PartialState
    pairs_per_micro, accum = dpo_batch_split(cfg, PartialState().num_processes)
    work_dir = Path(cfg.output_dir) / "checkpoints" if cfg.output_dir else Path(tempfile.mkdtemp(prefix="dpo-"))
    args = DPOConfig(
        output_dir=str(work_dir), num_train_epochs=cfg.epochs_per_batch, per_device_train_batch_size=pairs_per_micro,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule],
        warmup_steps=cfg.warmup_steps * cfg.epochs_per_batch * (cfg.rollouts_per_step // cfg.minibatch_size),
        max_grad_norm=cfg.max_grad_norm or 1e9, beta=cfg.dpo_beta,
        max_length=cfg.dpo_max_length or cfg.max_prompt_tokens + cfg.max_new_tokens,
        bf16=precision == "bf16", fp16=precision == "fp16", activation_checkpointing=False, use_cpu=use_cpu,
        logging_steps=1, save_strategy="steps" if cfg.checkpoint_every and cfg.output_dir else "no",
        save_steps=max(1, cfg.checkpoint_every), save_total_limit=cfg.keep_checkpoints,
        report_to=(tracking.tracker_names(cfg.report_to) if cfg.output_dir else None) or "none",
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not cfg.progress, dataloader_num_workers=0,
        # The reference is frozen: its log-probs of every pair once, before training, in batches of
        # eval_batch_size, not again in each of the epochs_per_batch epochs (and at 7B, no second
        # copy of the model in memory during training).
        precompute_ref_log_probs=True, precompute_ref_batch_size=max(1, cfg.eval_batch_size // 2))
    # No reference model: with precompute_ref_log_probs TRL reads the reference's log-probs from the
    # policy itself before its first update, when it still is the initial policy.
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train, processing_class=tokenizer)
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when tqdm is off
    for callback in trainer.callback_handler.callbacks:   # TensorBoard files where the online methods' go
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(Path(cfg.output_dir) / tracking.TRACKING_DIR / "policy_dpo")

    if reward_model is None:
        reward_model = load_reward_scorer(cfg.reward_model, device=trainer.args.device,
                                          dtype=torch.bfloat16 if precision == "bf16" else None)
    _, eval_prompts = load_prompts(cfg, tokenizer)
    eval_kwargs = eval_settings(cfg)
    evals, eval_details, eval_s = [], [], 0.0

    def run_eval(step: int, tuned) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        if step == 0 and initial_eval is not None:
            e = initial_eval                # not trained yet: the initial policy's evaluation
        else:
            with torch.autocast(trainer.args.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                wrapped = policy_with_reference(initial_path, tuned, cfg.unfrozen_layers, device=trainer.args.device)
                e = evaluate_policy(wrapped, tokenizer, reward_model, eval_prompts, **eval_kwargs)
        evals.append({"step": step, **{f"policy/dpo/eval_{k}": v for k, v in e.items() if k not in ("examples", "rewards")}})
        eval_details.append({"step": step, **e})
        eval_s += time.perf_counter() - t

    if cfg.eval_every and eval_prompts:
        run_eval(0, model)
    resume = bool(cfg.output_dir and cfg.resume and any(work_dir.glob("checkpoint-*")))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    wall_s = time.perf_counter() - t0
    trained = trainer.model
    trained.eval()
    if cfg.eval_every and eval_prompts:
        run_eval(cfg.steps, trained)

    # One record per optimizer step, under the same policy/<method>/ names as the online methods where they mean the same.
    names = {"loss": "policy_loss", "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
             "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin", "entropy": "entropy",
             "learning_rate": "lr"}
    history = [{"step": h["step"], **{f"policy/dpo/{names[k]}": v for k, v in h.items() if k in names}}
               for h in trainer.state.log_history if "loss" in h]
    policy_dir = None
    if cfg.output_dir and cfg.save_policy:
        policy_dir = save_policy(trained, tokenizer, Path(cfg.output_dir) / "policy", {
            "method": "dpo", "training": cfg.fingerprint(), "optimizer_steps": trainer.state.global_step})
    wrapped = policy_with_reference(initial_path, trained, cfg.unfrozen_layers, device=trainer.args.device)
    return PolicyTrainResult(policy=wrapped, tokenizer=tokenizer, history=history, evals=evals, wall_s=wall_s,
                             eval_s=eval_s, steps_run=cfg.steps, config=cfg, policy_dir=policy_dir,
                             extra={"num_pairs": len(train), "grad_accum_steps": accum,
                                    "optimizer_steps": trainer.state.global_step,
                                    "sequences_per_optimizer_step": 2 * pairs_per_micro * accum},
                             eval_details=eval_details)
