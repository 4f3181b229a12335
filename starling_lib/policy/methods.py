"""APA, PPO and P3O, one block each: what a method makes of a scored rollout batch, and its loss.

The online loop (policy.online) is the same for the three methods: sample, score, one no-grad
forward for the old / reference log-probs and values, then epochs of minibatch updates. What
differs is here, each method readable top to bottom:

    targets(cfg, b, total) -> the tensors its loss reads (advantages and returns, or the pair's
                       reward difference), one row per response, and stats to log; `total` sums a
                       tensor over the processes (the batch's statistics are the whole batch's)
    loss(cfg, out, mb) -> (loss, stats) of one micro-batch: a mean over its response tokens
                       (APA, PPO) or its pairs (P3O)
    row_weight(b)       -> (B,) what each row counts for in that mean (its response tokens, or half
                       a pair), so the loop can weight micro-batches into the mean over a minibatch
                       spread across processes

`b` holds the rollout batch, one row per response (B rows, R response positions):
    mask (B, R)          response tokens (not padding)
    old_logprobs (B, R)  log pi_old of each token (the policy that sampled it)
    ref_logprobs (B, R)  log pi_init (the frozen reference)
    kl (B, R)            per-token KL penalty estimate (cfg.kl_estimator), zero off the mask
    scores (B,)          reward-model scores after `normalize_scores`
    values (B, R)        the critic's values (APA and PPO only)
`out` is the policy's forward on a micro-batch (logprobs, and values for APA / PPO); `mb` is `b`
plus the targets, restricted to the micro-batch's rows.

Departures from the papers and the authors' code (also in PolicyTrainConfig's field docs), with
their measured effect on tests/test_policy.py's bandit (LetterReward, 2-token responses, 16 steps
of 8 rollouts, lr 3e-3; gain in held-out reward per seed 0, 1, 2, s.e. of each about 0.05-0.08):
- PPO's and APA's critic is a value head on the policy's last hidden state (it shares the
  trainable top layers), with PPO's clipped value loss (clip_eps_v) and vf_coef 0.1, where
  microsoft/RLHF-APA trains its own critic with an unclipped value loss and vf_coef 1. Measured
  for APA: ours +0.10 / -0.03 / +0.11, the authors' vf_coef 1 unclipped +0.04 / +0.11 / +0.11,
  no value loss at all (vf_coef 0) +0.12 / +0.01 / +0.23: no effect beyond the noise;
- advantages are whitened over the rollout batch (all processes together), masked (the authors:
  unmasked, per minibatch). With lam 0.1 either way the target A / lam is about +-10 nats a token, so the pull
  towards pi_init (the log-ratio term) is about a tenth of the advantage term until log(pi /
  pi_init) reaches several nats: early on APA moves like an unclipped policy gradient. Measured
  for APA, seeds 0-4 (all held-out prompts): whitened +0.10 / -0.03 / +0.11 / +0.21 / +0.21
  (mean +0.12), not whitened +0.20 / +0.06 / +0.13 / +0.28 / +0.02 (mean +0.14); PPO, whitened,
  +0.14 / -0.02 / +0.11 / +0.21 / +0.13 (mean +0.11): APA learns the bandit as well as PPO does, and whitening is kept;
  with 16 rollouts a step in minibatches of 8 (the test's settings now) all three methods
  clear the test on seeds 0-2: APA +0.18 / +0.17 / +0.12, PPO +0.16 / +0.20 / +0.27;
  P3O ("ratio" form) +0.27 / +0.07 / +0.10 under the old settings;
- P3O ("joint", the default) is the Starling authors' update (thwu1/trlx's P3O trainer,
  losses.p3o_authors_loss): the reward difference D = (s_1 - s_2) - beta (L_1 - L_2) with the
  KL L_i recomputed from the current policy every minibatch, the pair's log-ratio gap clipped to
  within clip_eps of the rollout's, weighted by clip(rho_1 rho_2, 1/10, 10). This project's
  earlier form, kept as p3o_variant "ratio", clips the ratio rho_1 / rho_2 and fixes the KL at
  rollout; on-policy the two have the same gradient, after the policy moves they differ
  (tests/test_losses.py). Measured on the bandit at the test's settings, seeds 0 / 1 / 2:
  joint +0.11 / +0.19 / +0.19, ratio +0.16 / +0.16 / +0.24 (s.e. 0.04-0.07):
  indistinguishable. Only tokenwise-off, mean-over-pairs (the authors' defaults) is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from starling_lib.losses import (apa_loss, gae, kl_penalty, local_sum, masked_mean, masked_whiten, p3o_authors_loss,
                                 p3o_loss, ppo_policy_loss, ppo_value_loss)
from starling_lib.policy.config import PolicyTrainConfig
from starling_lib.rollout import per_token_rewards

Tensors = dict[str, torch.Tensor]
Total = Callable[[torch.Tensor], torch.Tensor]   # sums a tensor over processes (local_sum on one)


def normalize_scores(scores: torch.Tensor, kind: str, group: int = 1, total: Total = local_sum) -> torch.Tensor:
    """Reward-model scores (B,) of one rollout batch: as they are ("none"), minus their mean
    ("center"), standardised ("whiten"), or minus the mean of their prompt's `group` responses
    ("prompt"; the batch holds each prompt's responses in consecutive rows). The mean and standard
    deviation are the whole batch's, over every process (`total`)."""
    if kind == "none":
        return scores
    if kind == "prompt":
        b_groups = scores.view(-1, group)                                   # (prompts, group)
        return (b_groups - b_groups.mean(1, keepdim=True)).flatten()
    n = total(scores.new_tensor(float(len(scores))))
    centered = scores - total(scores.sum()) / n
    if kind == "center":
        return centered
    if n.item() < 2:
        return centered
    std = (total((centered ** 2).sum()) / (n - 1)).sqrt()                  # unbiased, as Tensor.std
    return centered / (std + 1e-8)


def _gae_targets(cfg: PolicyTrainConfig, b: Tensors, b_rewards: torch.Tensor, total: Total) -> Tensors:
    """Advantages (whitened over the whole batch if asked) and returns by GAE from per-token rewards (B, R)."""
    b_advantages, b_returns = gae(b_rewards, b["values"], b["mask"], cfg.gamma, cfg.gae_lambda)
    if cfg.whiten_advantages:
        b_advantages = masked_whiten(b_advantages, b["mask"], total=total)
    return {"advantages": b_advantages, "returns": b_returns}


def token_weight(b: Tensors) -> torch.Tensor:
    """(B,) APA's and PPO's losses are means over response tokens: a row counts its tokens."""
    return b["mask"].sum(-1).float()


def pair_weight(b: Tensors) -> torch.Tensor:
    """(B,) P3O's loss is a mean over pairs: a row is half of one."""
    return torch.full((len(b["mask"]),), 0.5, device=b["mask"].device)


def _value_loss(cfg: PolicyTrainConfig, out: Tensors, mb: Tensors) -> tuple[torch.Tensor, dict]:
    return ppo_value_loss(out["values"], mb["values"], mb["returns"], mb["mask"], cfg.clip_eps_v)


# --------------------------------------------------------------------------------------------
# APA (Zhu et al. 2023, Starling's choice): pull log(pi / pi_init) towards A / lam.
# The loss itself anchors the policy to pi_init, so the reward carries no KL term.


def apa_targets(cfg: PolicyTrainConfig, b: Tensors, total: Total = local_sum) -> tuple[Tensors, dict]:
    b_rewards = per_token_rewards(b["scores"], b["kl"], b["mask"], beta=0.0)   # the RM score on the last token
    return _gae_targets(cfg, b, b_rewards, total), {}


def apa_minibatch_loss(cfg: PolicyTrainConfig, out: Tensors, mb: Tensors) -> tuple[torch.Tensor, dict]:
    pg_loss, stats = apa_loss(out["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["mask"], cfg.lam)
    with torch.no_grad():  # how far this update has moved from the rollout policy
        stats["approx_kl"] = masked_mean(kl_penalty(mb["old_logprobs"], out["logprobs"], "k3"), mb["mask"])
    vf_loss, vf_stats = _value_loss(cfg, out, mb)
    return pg_loss + cfg.vf_coef * vf_loss, {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                                              **stats, **vf_stats}


# --------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017; Ziegler et al. 2019's RLHF form): the clipped surrogate, with the
# KL to pi_init folded into the per-token reward.


def ppo_targets(cfg: PolicyTrainConfig, b: Tensors, total: Total = local_sum) -> tuple[Tensors, dict]:
    b_rewards = per_token_rewards(b["scores"], b["kl"], b["mask"], beta=cfg.beta)   # score - beta * KL_t
    return _gae_targets(cfg, b, b_rewards, total), {"non_score_reward": -cfg.beta * b["kl"].sum(-1).mean()}


def ppo_minibatch_loss(cfg: PolicyTrainConfig, out: Tensors, mb: Tensors) -> tuple[torch.Tensor, dict]:
    pg_loss, stats = ppo_policy_loss(out["logprobs"], mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.clip_eps)
    vf_loss, vf_stats = _value_loss(cfg, out, mb)
    return pg_loss + cfg.vf_coef * vf_loss, {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                                              **stats, **vf_stats}


# --------------------------------------------------------------------------------------------
# P3O (Wu et al. 2023): two responses per prompt; the pairwise clipped objective on the
# difference of their KL-penalised rewards; no critic. Rows come in pairs, first response first.
# "joint" (the authors' form) reads the scores and recomputes the KL; "ratio" and "separate"
# read the reward difference fixed at rollout.


def p3o_targets(cfg: PolicyTrainConfig, b: Tensors, total: Total = local_sum) -> tuple[Tensors, dict]:
    b_seq_rewards = b["scores"] - cfg.beta * b["kl"].sum(-1)                   # (B,) r_i = RM(y_i) - beta KL_i
    # (B,) with each pair's r_1 - r_2 on both of its rows; the loss reads it from the first.
    return {"reward_diff": (b_seq_rewards[0::2] - b_seq_rewards[1::2]).repeat_interleave(2)}, {}


def p3o_minibatch_loss(cfg: PolicyTrainConfig, out: Tensors, mb: Tensors) -> tuple[torch.Tensor, dict]:
    lp, old, ref, mask = out["logprobs"], mb["old_logprobs"], mb["ref_logprobs"], mb["mask"]
    if cfg.p3o_variant == "joint":   # the authors' form: the KL in D recomputed from the current policy
        loss, stats = p3o_authors_loss(lp[0::2], old[0::2], ref[0::2], mask[0::2], lp[1::2], old[1::2], ref[1::2],
                                       mask[1::2], mb["scores"][0::2], mb["scores"][1::2], cfg.beta, cfg.clip_eps,
                                       cfg.p3o_ratio_clip)
    else:
        loss, stats = p3o_loss(lp[0::2], old[0::2], mask[0::2], lp[1::2], old[1::2], mask[1::2],
                               mb["reward_diff"][0::2], cfg.clip_eps, cfg.p3o_variant)
    return loss, {"policy_loss": loss.detach(), **stats}


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineMethod:
    """An online method as the loop sees it."""

    targets: Callable[[PolicyTrainConfig, Tensors, Total], tuple[Tensors, dict]]
    loss: Callable[[PolicyTrainConfig, Tensors, Tensors], tuple[torch.Tensor, dict]]
    row_weight: Callable[[Tensors], torch.Tensor]   # (B,) each row's share of the loss's mean
    critic: bool   # whether it has a value head (its rollout forward computes values)


ONLINE_METHODS = {
    "apa": OnlineMethod(apa_targets, apa_minibatch_loss, token_weight, critic=True),
    "ppo": OnlineMethod(ppo_targets, ppo_minibatch_loss, token_weight, critic=True),
    "p3o": OnlineMethod(p3o_targets, p3o_minibatch_loss, pair_weight, critic=False),
}
