"""Losses against hand-computed values and naive reference implementations."""

import math

import pytest
import torch

from starling_lib.losses import bradley_terry_loss, pairwise_split_loss, plackett_luce_loss


def naive_pl(rewards, mask=None):
    """Python loop over lists and positions, straight from the formula."""
    total = 0.0
    for b in range(rewards.shape[0]):
        r = rewards[b] if mask is None else rewards[b][mask[b]]
        total = total - sum(r[j] - torch.logsumexp(r[j:], 0) for j in range(len(r)))
    return total / rewards.shape[0]


def test_plackett_luce_hand_computed():
    # K = 3, rewards (2, 1, 0): -[(2 - log(e^2 + e + 1)) + (1 - log(e + 1)) + 0]
    expected = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-6)
    # equal rewards: every ordering of 3 is equally likely, -log(1/3!) = log 6
    assert plackett_luce_loss(torch.zeros(1, 3)).item() == pytest.approx(math.log(6), rel=1e-6)


def test_plackett_luce_k2_is_bradley_terry():
    r = torch.randn(16, 2)
    assert torch.allclose(plackett_luce_loss(r), bradley_terry_loss(r[:, 0], r[:, 1]), atol=1e-6)


def test_bradley_terry_hand_computed():
    # -log sigmoid(1) = log(1 + e^-1)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log1p(math.exp(-1)))


def test_plackett_luce_matches_naive_loop_values_and_gradients():
    torch.manual_seed(0)
    r1 = torch.randn(5, 7, requires_grad=True)
    r2 = r1.detach().clone().requires_grad_(True)
    loss, ref = plackett_luce_loss(r1), naive_pl(r2)
    loss.backward(), ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(r1.grad, r2.grad, atol=1e-6)


def test_plackett_luce_mask_equals_shorter_lists():
    torch.manual_seed(1)
    r = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = plackett_luce_loss(r, mask)
    loss.backward()
    r_ref = r.detach().clone().requires_grad_(True)
    ref = naive_pl(r_ref, mask)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(r.grad, r_ref.grad, atol=1e-6)
    assert torch.all(r.grad[~mask] == 0) and torch.isfinite(r.grad).all()
    # whatever sits in the masked slots does not matter
    garbage = r.detach().masked_fill(~mask, 1e4)
    assert plackett_luce_loss(garbage, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_plackett_luce_stable_for_large_rewards_and_low_precision():
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert plackett_luce_loss(big).item() == pytest.approx(0.0, abs=1e-6)        # certain ranking
    assert plackett_luce_loss(big.flip(-1)).item() == pytest.approx(3000.0, rel=1e-6)
    torch.manual_seed(2)
    r = torch.randn(4, 7) * 5
    for dtype in (torch.bfloat16, torch.float16):
        low = r.to(dtype).requires_grad_(True)
        loss = plackett_luce_loss(low)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(low.grad.float()).all()
        assert loss.item() == pytest.approx(plackett_luce_loss(r.to(dtype).float()).item(), rel=1e-6)


def test_plackett_luce_prefers_correct_order():
    assert plackett_luce_loss(torch.tensor([[3.0, 2.0, 1.0]])) < plackett_luce_loss(torch.tensor([[1.0, 2.0, 3.0]]))


def test_pairwise_split_hand_computed():
    r = torch.tensor([[2.0, 1.0, 0.0]])
    # pairs (2,1), (2,0), (1,0): mean of -log sigmoid(1), -log sigmoid(2), -log sigmoid(1)
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert pairwise_split_loss(r).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[True, True, False]])
    assert pairwise_split_loss(r, mask).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    pairs = torch.randn(8, 2)
    assert torch.allclose(pairwise_split_loss(pairs), bradley_terry_loss(pairs[:, 0], pairs[:, 1]), atol=1e-6)


# --- policy losses ---------------------------------------------------------------------------

from starling_lib.losses import (apa_loss, dpo_loss, gae, kl_penalty, masked_mean, masked_whiten,  # noqa: E402
                                 p3o_authors_loss, p3o_loss, ppo_policy_loss, ppo_value_loss)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(3.0)
    assert torch.allclose(masked_mean(x, MASK, dim=1), torch.tensor([2.0, 4.5]))
    w = masked_whiten(x, MASK)
    assert w[1, 2] == 0
    assert masked_mean(w, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w ** 2, MASK).item() == pytest.approx(1.0, rel=1e-4)


def test_kl_estimators():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 with log q = ref - lp = (-0.5, 1): (e^-0.5 - 1) + 0.5 and (e - 1) - 1
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]])
    assert torch.allclose(kl_penalty(lp, ref, "k3"), expected)
    assert (kl_penalty(torch.randn(4, 5), torch.randn(4, 5), "k3") >= 0).all()


def test_gae_hand_computed():
    # one sequence of 3 valid tokens then padding; gamma = 1, lambda = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=0.5)
    d2 = 1.0 - 0.4                      # last valid token: no next value
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]), atol=1e-6)
    # lambda = 1, gamma = 1: advantage = sum of future rewards - V_t (Monte Carlo)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    assert torch.allclose(adv1[0, :3], torch.tensor([0.5, 0.8, 0.6]), atol=1e-6)


def test_apa_loss_hand_computed_and_masking():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 50.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    adv = torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.2, 7.0]])
    # per valid token: (lp - ref - adv / 0.1)^2 = (0.5-1)^2, 0, (-1+1)^2, 0, (1-2)^2 -> mean over 5
    loss, stats = apa_loss(lp, ref, adv, MASK, lam=0.1)
    assert loss.item() == pytest.approx((0.25 + 0 + 0 + 0 + 1.0) / 5)
    assert stats["log_ratio_mean"].item() == pytest.approx((0.5 + 0 - 1 + 0 + 1) / 5)


def test_apa_minimiser_is_the_kl_regularised_target():
    ref = torch.randn(2, 3)
    adv = torch.randn(2, 3)
    loss, _ = apa_loss(ref + adv / 0.5, ref, adv, torch.ones(2, 3, dtype=torch.bool), lam=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_ppo_policy_loss_clipping():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))          # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(lp, old, adv, torch.ones(1, 3, dtype=torch.bool), clip_eps=0.2)
    # token 0: A>0, ratio 1.5 clipped to 1.2 -> -1.2; token 1: A>0, ratio 0.5 -> max(-0.5, -0.8) = -0.5;
    # token 2: A<0, ratio 1.1 inside the range -> 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    # a masked token with a huge ratio changes nothing
    lp2 = torch.cat([lp, torch.tensor([[20.0]])], 1)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss2, _ = ppo_policy_loss(lp2, torch.zeros(1, 4), torch.cat([adv, torch.ones(1, 1)], 1), mask)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_ppo_policy_gradient_at_ratio_one_is_policy_gradient():
    lp = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss, _ = ppo_policy_loss(lp, torch.zeros(1, 2), adv, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 2)


def test_ppo_value_loss_hand_computed():
    v, v_old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 0.1]])
    loss, stats = ppo_value_loss(v, v_old, ret, torch.ones(1, 2, dtype=torch.bool), clip_eps_v=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 1: 0.01 both
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2, rel=1e-6)
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("variant", ["ratio", "separate"])
def test_p3o_unclipped_gradient_is_pairwise_policy_gradient(variant):
    # at rho = 1 the gradient wrt each token log-prob is -(r1 - r2)/2 for y1 and +(r1 - r2)/2 for y2 (per pair, mean over B)
    lp1 = torch.zeros(2, 3, requires_grad=True)
    lp2 = torch.zeros(2, 3, requires_grad=True)
    m1 = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    m2 = torch.ones(2, 3, dtype=torch.bool)
    diff = torch.tensor([1.0, -4.0])
    loss, _ = p3o_loss(lp1, torch.zeros(2, 3), m1, lp2, torch.zeros(2, 3), m2, diff, variant=variant)
    loss.backward()
    assert torch.allclose(lp1.grad, (-diff / 2 / 2).unsqueeze(1) * m1)
    assert torch.allclose(lp2.grad, (diff / 2 / 2).unsqueeze(1) * m2)


def test_p3o_clipping_variants_hand_computed():
    one = torch.ones(1, 1, dtype=torch.bool)
    lp1, lp2 = torch.log(torch.tensor([[1.5]])), torch.log(torch.tensor([[0.5]]))
    zero = torch.zeros(1, 1)
    diff = torch.tensor([2.0])                                 # D/2 = 1
    joint, stats = p3o_loss(lp1, zero, one, lp2, zero, one, diff, clip_eps=0.2, variant="ratio")
    assert joint.item() == pytest.approx(-1.2, rel=1e-6)       # rho = 3 clipped to 1.2
    assert stats["clip_frac"].item() == 1.0
    sep, _ = p3o_loss(lp1, zero, one, lp2, zero, one, diff, clip_eps=0.2, variant="separate")
    # y1: adv +1, rho 1.5 -> -1.2 ; y2: adv -1, rho 0.5 -> max(0.5, 0.8) = 0.8
    assert sep.item() == pytest.approx(-1.2 + 0.8, rel=1e-6)
    with pytest.raises(ValueError, match="variant"):
        p3o_loss(lp1, zero, one, lp2, zero, one, diff, variant="both")


def test_p3o_authors_form_on_policy_is_the_pairwise_policy_gradient():
    # policy = rollout policy = reference: L_1 = L_2 = 0, w = 1, D = s_1 - s_2; the gradient wrt each
    # token log-prob is -D/2 for y_1 and +D/2 for y_2, over the B = 2 pairs
    lp1 = torch.zeros(2, 3, requires_grad=True)
    lp2 = torch.zeros(2, 3, requires_grad=True)
    m1 = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    m2 = torch.ones(2, 3, dtype=torch.bool)
    zero = torch.zeros(2, 3)
    s1, s2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    loss, _ = p3o_authors_loss(lp1, zero, zero, m1, lp2, zero, zero, m2, s1, s2, kl_coef=0.5)
    loss.backward()
    diff = s1 - s2
    assert torch.allclose(lp1.grad, (-diff / 2 / 2).unsqueeze(1) * m1)
    assert torch.allclose(lp2.grad, (diff / 2 / 2).unsqueeze(1) * m2)


def test_p3o_authors_form_hand_computed_after_the_policy_moved():
    one = torch.ones(1, 1, dtype=torch.bool)
    zero = torch.zeros(1, 1)
    # rollout = reference (log-probs 0); now log pi = 0.3 for y_1, -0.1 for y_2: L_1 = 0.3, L_2 = -0.1, gap 0.4.
    # D = (2 - 1) - 0.5 * 0.4 = 0.8; w = exp(0.3 - 0.1) = 1.2214; the gap is clipped to 0 + 0.2:
    # max(-0.8 w 0.4, -0.8 w 0.2) / 2 = -0.8 * 1.2214 * 0.2 / 2 = -0.09771, with no gradient (clipped side)
    lp1 = torch.tensor([[0.3]], requires_grad=True)
    lp2 = torch.tensor([[-0.1]], requires_grad=True)
    loss, stats = p3o_authors_loss(lp1, zero, zero, one, lp2, zero, zero, one, torch.tensor([2.0]), torch.tensor([1.0]),
                                   kl_coef=0.5, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.exp(0.2) * 0.2 / 2, rel=1e-5)
    assert stats["clip_frac"].item() == 1.0
    loss.backward()
    assert lp1.grad.abs().item() == 0 and lp2.grad.abs().item() == 0
    # the importance weight rho_1 rho_2 = 5 * 4 = 20 is clipped to c = 10: D = 1 (no KL term),
    # gap ln(5/4) = 0.223 clipped to 0.2: loss = max(-10 * 0.223, -10 * 0.2) / 2 = -1.0
    loss, _ = p3o_authors_loss(torch.log(torch.tensor([[5.0]])), zero, zero, one, torch.log(torch.tensor([[4.0]])), zero,
                               zero, one, torch.tensor([1.0]), torch.tensor([0.0]), kl_coef=0.0, clip_eps=0.2,
                               ratio_clip=10.0)
    assert loss.item() == pytest.approx(-1.0, rel=1e-6)


def test_p3o_authors_form_differs_from_the_ratio_form_once_the_policy_moves():
    # the same moved policy as above, unclipped (eps large): the authors' gradient is -D w / 2 on y_1 with D
    # recomputed from the current KL (0.8) and w = 1.2214; the ratio form's is -(D_rollout / 2) rho = -(1 / 2) 1.2214
    one = torch.ones(1, 1, dtype=torch.bool)
    zero = torch.zeros(1, 1)
    a1 = torch.tensor([[0.3]], requires_grad=True)
    loss, _ = p3o_authors_loss(a1, zero, zero, one, torch.tensor([[-0.1]]), zero, zero, one, torch.tensor([2.0]),
                               torch.tensor([1.0]), kl_coef=0.5, clip_eps=10.0)
    loss.backward()
    r1 = torch.tensor([[0.3]], requires_grad=True)
    ratio_loss, _ = p3o_loss(r1, zero, one, torch.tensor([[-0.1]]), zero, one, torch.tensor([1.0]), clip_eps=10.0,
                             variant="ratio")
    ratio_loss.backward()
    assert a1.grad.item() == pytest.approx(-0.8 * math.exp(0.2) / 2, rel=1e-5)
    assert r1.grad.item() == pytest.approx(-0.5 * math.exp(0.4), rel=1e-5)   # d/dlp1 of -(1/2) exp(lp1 - lp2)


def test_dpo_loss_hand_computed():
    loss, stats = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    # beta * ((-1 + 2) - (-3 + 2)) = 0.5 * 2 = 1 -> -log sigmoid(1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert stats["reward_accuracy"].item() == 1.0 and stats["reward_margin"].item() == pytest.approx(1.0)
