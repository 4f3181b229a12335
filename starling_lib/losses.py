"""Loss functions of the Starling pipeline: pure tensor code, no I/O, no models.

Reward model (notebook 03)
  plackett_luce_loss   K-wise maximum-likelihood loss of Zhu, Jordan, Jiao (2023), arXiv:2301.11270
  bradley_terry_loss   pairwise loss; the K = 2 case of the above
  pairwise_split_loss  a K-wise ranking split into its K(K-1)/2 pairs (the baseline the paper beats)

Policy (notebook 04); token tensors are (B, T) over the generated tokens with a (B, T) mask
  masked_mean, masked_whiten, kl_penalty, gae   the RLHF plumbing (Ziegler et al. 2019, arXiv:1909.08593)
  apa_loss             advantage-induced policy alignment (Zhu et al. 2023, arXiv:2306.02231)
  ppo_policy_loss      clipped surrogate (Schulman et al. 2017, arXiv:1707.06347); ppo_value_loss
  p3o_loss             pairwise PPO over two responses to one prompt (Wu et al. 2023, arXiv:2310.00212)
  dpo_loss             direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290)
Each policy loss returns (loss, stats): the scalar to backpropagate, then detached statistics.

Shapes: B lists (prompts), K answers per list ordered best to worst; T generated tokens.

Departures from the papers:
- losses are computed in float32 whatever the input dtype, so that bf16/fp16 inputs from a
  mixed-precision forward do not lose the small differences the losses are made of;
- a mask lets one batch hold lists of different lengths (Nectar prompts with fewer answers);
- token means are over all valid tokens of the batch (not per sequence, then over sequences), so a
  long response weighs more, as in TRL's and the APA authors' implementations;
- P3O uses sequence-level importance ratios, computed from summed token log-probs, as the paper's
  trajectory-wise formulation does; both of its clipping variants are offered (see p3o_loss).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Stands in for -inf at masked positions: exp() of it is exactly 0 next to any real reward, and
# unlike -inf it keeps (masked - masked) finite, so no NaN can leak into the gradient.
_MASKED = -1e9


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of the observed rankings under Plackett-Luce, mean over lists.

    P(answer j is chosen first among those not yet chosen) = exp(r_j) / sum_{k >= j} exp(r_k),
    so per list  -log P(ranking) = -sum_{j=1..K} [ r_j - logsumexp(r_j, ..., r_K) ].
    The last term is always 0 (a single remaining answer is chosen with probability 1).

    rewards: (B, K) scores, column 0 the best answer.
    mask:    (B, K) bool, True where an answer exists; masked answers take no part in any term.
    """
    r = rewards.float()                                                        # (B, K)
    if mask is not None:   # (without one, no masking work: the loss is a millisecond of per-op overhead)
        r = r.masked_fill(~mask, _MASKED)
    # logsumexp over each suffix r_j..r_K, all at once: a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)              # (B, K)
    terms = r - suffix_lse                                                     # (B, K)
    if mask is not None:
        terms = terms * mask
    return -terms.sum(-1).mean()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected).  chosen, rejected: (B,)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pairwise_split_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry over every (better, worse) pair of each ranking, mean over pairs.

    rewards: (B, K) best to worst; mask (B, K) as in plackett_luce_loss.
    This is what "splitting the ranking into pairs" optimises (21 pairs for K = 7).
    """
    r = rewards.float()                                                        # (B, K)
    if mask is None:
        mask = torch.ones_like(r, dtype=torch.bool)
    k = r.shape[-1]
    diff = r.unsqueeze(-1) - r.unsqueeze(-2)                                   # (B, K, K): r_i - r_j
    better = torch.ones(k, k, dtype=torch.bool, device=r.device).triu(1)       # i ranked above j
    pair_mask = better & mask.unsqueeze(-1) & mask.unsqueeze(-2)               # (B, K, K)
    return -(F.logsigmoid(diff) * pair_mask).sum() / pair_mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Policy optimisation

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is true (over everything, or along `dim`)."""
    x, mask = x.float(), mask.float()
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def local_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over processes when there is only this one: `t` itself."""
    return t


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total: Callable[[torch.Tensor], torch.Tensor] = local_sum) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean) over the valid positions; 0 elsewhere.

    total: sums a tensor over the processes that hold the rest of the batch (e.g.
    `lambda t: accelerator.reduce(t, "sum")`), so the mean and variance are the whole batch's.
    """
    x, m = x.float(), mask.float()
    n = total(m.sum()).clamp(min=1)
    mean = total((x * m).sum()) / n                        # ()
    var = total((((x - mean) ** 2) * m).sum()) / n         # ()
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.  (B, T) -> (B, T).

    k1 = log pi - log pi_ref: unbiased, can be negative per token.
    k3 = (q - 1) - log q with q = pi_ref / pi: unbiased and always >= 0 (Schulman, "Approximating KL").
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, gae_lambda: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded token sequences.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lambda)^l delta_{t+l},  returns = A + V.
    After the last valid token the episode has ended: V there is 0 and nothing flows back.
    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), zero where masked.
    """
    rewards, values, m = rewards.float(), values.float(), mask.float()
    b_adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])                                   # (B,)
    T = rewards.shape[1]
    # A loop over T is the clearest form and costs nothing next to a forward pass.
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * gae_lambda * last) * m[:, t]
        b_adv[:, t] = last
    return b_adv, (b_adv + values) * m


def apa_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, lam: float = 0.1) -> tuple[torch.Tensor, dict]:
    """APA: masked mean of (log pi - log pi_init - A / lam)^2.

    The squared loss pulls log(pi / pi_init) towards A / lam, i.e. pi towards pi_init * exp(A / lam):
    the KL-regularised optimum, reached without a KL term in the reward. `ref_logprobs` are the
    initial policy's; `lam` is the paper's lambda (the authors' code used 0.1).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()                      # (B, T)
    target = advantages.float() / lam
    loss = masked_mean((log_ratio - target) ** 2, mask)
    with torch.no_grad():
        stats = {"log_ratio_mean": masked_mean(log_ratio, mask), "target_mean": masked_mean(target, mask)}
    return loss, stats


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: masked mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).

    rho = exp(log pi - log pi_old), per token; `old_logprobs` are the rollout policy's.
    """
    log_ratio = logprobs.float() - old_logprobs.float()                      # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_eps_v: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 masked mean of max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2)."""
    v, v_old, ret = values.float(), old_values.float(), returns.float()
    v_clipped = v_old + torch.clamp(v - v_old, -clip_eps_v, clip_eps_v)
    unclipped, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def p3o_loss(logprobs_1: torch.Tensor, old_logprobs_1: torch.Tensor, mask_1: torch.Tensor,
             logprobs_2: torch.Tensor, old_logprobs_2: torch.Tensor, mask_2: torch.Tensor,
             reward_diff: torch.Tensor, clip_eps: float = 0.2,
             variant: str = "ratio") -> tuple[torch.Tensor, dict]:
    """P3O: the pairwise policy gradient over two responses y1, y2 to the same prompt.

    The unclipped gradient is (r1 - r2) grad[log pi(y1) - log pi(y2)] / 2: only the reward
    *difference* matters, so no value network or baseline is needed. Ratios are sequence-level,
    rho_i = pi(y_i) / pi_old(y_i) from summed token log-probs. reward_diff: (B,) r1 - r2, already
    KL-regularised by the caller (r_i = RM(y_i) - beta KL_i), treated as a constant.

    With D = r1 - r2 and clip(x) = clip(x, 1 - eps, 1 + eps):
    variant "ratio" (the paper's joint clipping as a ratio): one ratio rho = rho_1 / rho_2 for the
        pair, loss = mean over pairs of max(-D/2 rho, -D/2 clip(rho)). The Starling authors' code
        clips differently (`p3o_authors_loss`, the trainer's "joint"); on-policy the two agree.
    variant "separate" (separate clipping): each response is a PPO sample with advantage +D/2 or -D/2,
        loss = mean over pairs of max(-D/2 rho_1, -D/2 clip(rho_1)) + max(D/2 rho_2, D/2 clip(rho_2)).
    At rho = 1 both have the gradient of the unclipped pairwise policy gradient above.
    """
    seq_lr_1 = ((logprobs_1.float() - old_logprobs_1.float()) * mask_1).sum(-1)   # (B,)
    seq_lr_2 = ((logprobs_2.float() - old_logprobs_2.float()) * mask_2).sum(-1)   # (B,)
    half = reward_diff.float().detach() / 2                                       # (B,)

    def clipped_objective(log_ratio, adv):
        ratio = torch.exp(log_ratio)
        unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        return torch.maximum(unclipped, clipped), (clipped > unclipped).float()

    if variant == "ratio":
        per_pair, clipped = clipped_objective(seq_lr_1 - seq_lr_2, half)
    elif variant == "separate":
        obj_1, clip_1 = clipped_objective(seq_lr_1, half)
        obj_2, clip_2 = clipped_objective(seq_lr_2, -half)
        per_pair, clipped = obj_1 + obj_2, (clip_1 + clip_2) / 2
    else:
        raise ValueError(f"variant must be 'ratio' or 'separate', got {variant!r}")
    loss = per_pair.mean()
    with torch.no_grad():
        stats = {"clip_frac": clipped.mean(), "seq_log_ratio_mean": (seq_lr_1 + seq_lr_2).mean() / 2}
    return loss, stats


def p3o_authors_loss(logprobs_1: torch.Tensor, old_logprobs_1: torch.Tensor, ref_logprobs_1: torch.Tensor,
                     mask_1: torch.Tensor, logprobs_2: torch.Tensor, old_logprobs_2: torch.Tensor,
                     ref_logprobs_2: torch.Tensor, mask_2: torch.Tensor, scores_1: torch.Tensor,
                     scores_2: torch.Tensor, kl_coef: float, clip_eps: float = 0.2,
                     ratio_clip: float = 10.0) -> tuple[torch.Tensor, dict]:
    """P3O as the Starling authors ran it (thwu1/trlx, AccelerateP3OTrainer.p3o_loss, sequence-level).

    With L_i = sum over y_i's tokens of (log pi - log pi_ref) (current policy; `_old` at rollout):
        D = (s_1 - s_2) - kl_coef (L_1 - L_2)           recomputed every minibatch, held constant
        w = clip(rho_1 rho_2, 1 / c, c)                   rho_i = pi(y_i) / pi_old(y_i), constant, c = ratio_clip
        loss = mean over pairs of max(-D w (L_1 - L_2),
                                      -D w clip(L_1 - L_2, L1_old - L2_old - eps, L1_old - L2_old + eps)) / 2
    so the clip bounds how far the pair's log-ratio gap moves from the rollout's, rather than
    clipping the ratio rho_1 / rho_2 (`p3o_loss`'s "ratio" variant). On-policy (w = 1, gap at
    its rollout value) the gradient is -D/2 grad[log pi(y_1) - log pi(y_2)], the pairwise policy
    gradient. scores: (B,) the reward model's scores s_i, not KL-penalised (D carries the KL).
    """
    seq_1 = ((logprobs_1.float() - ref_logprobs_1.float()) * mask_1).sum(-1)          # (B,) L_1
    seq_2 = ((logprobs_2.float() - ref_logprobs_2.float()) * mask_2).sum(-1)          # (B,) L_2
    old_1 = ((old_logprobs_1.float() - ref_logprobs_1.float()) * mask_1).sum(-1)      # (B,) L_1 at rollout
    old_2 = ((old_logprobs_2.float() - ref_logprobs_2.float()) * mask_2).sum(-1)      # (B,) L_2 at rollout
    q = (scores_1.float() - scores_2.float() - kl_coef * (seq_1 - seq_2)).detach()    # (B,) D
    w = torch.exp((seq_1 - old_1) + (seq_2 - old_2)).clamp(1 / ratio_clip, ratio_clip).detach()   # (B,)
    gap, old_gap = seq_1 - seq_2, old_1 - old_2                                        # (B,)
    unclipped = -q * w * gap
    clipped = -q * w * torch.clamp(gap, old_gap - clip_eps, old_gap + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean() / 2
    with torch.no_grad():
        stats = {"clip_frac": (clipped > unclipped).float().mean(),
                 "seq_log_ratio_mean": ((seq_1 - old_1) + (seq_2 - old_2)).mean() / 2}
    return loss, stats


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO: mean of -log sigmoid(beta [(lp_c - lp_ref_c) - (lp_r - lp_ref_r)]).

    Inputs (B,): log-probs summed over each response's tokens.
    """
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())      # (B,) implicit rewards
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = {"chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
                 "reward_accuracy": (chosen > rejected).float().mean(),
                 "reward_margin": (chosen - rejected).mean()}
    return loss, stats
