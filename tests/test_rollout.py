"""Rollouts and the shared-trunk policy/reference on the tiny model."""

import copy

import pytest
import torch

from starling_lib.models import count_parameters, position_ids_from_mask
from starling_lib.rollout import SharedTrunkPolicy, generate, logprobs_from_logits, per_token_rewards

PROMPTS = [[{"role": "user", "content": "Hello"}],
           [{"role": "user", "content": "Can you tell me the functions of the Federal Reserve?"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Write a haiku about rain."}]]


def full_logprobs(model, batch):
    """Log-probs of the response tokens from a plain full forward of `model`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids_from_mask(batch.attention_mask)).logits
    P = batch.response_start
    return logprobs_from_logits(logits[:, P - 1:-1], batch.response_ids)


@pytest.fixture(scope="module")
def batch(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    return generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0)


def test_generate_left_pads_and_masks_after_eos(tiny, batch):
    _, tok = tiny
    assert batch.input_ids.shape[0] == 3 and batch.response_mask.shape == batch.response_ids.shape
    # left padding: every prompt ends right before the response
    assert (batch.attention_mask[:, batch.response_start - 1] == 1).all()
    assert (batch.input_ids[:, 0] == tok.pad_token_id).any()
    for row_ids, row_mask in zip(batch.response_ids, batch.response_mask):
        eos = (row_ids == tok.eos_token_id).nonzero()
        if len(eos):
            first = eos[0, 0].item()
            assert row_mask[: first + 1].all() and not row_mask[first + 1:].any()
        else:
            assert row_mask.all()
    assert len(batch.responses) == 3 and all(isinstance(r, str) for r in batch.responses)


def test_generate_stops_at_end_of_turn(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():  # make <|end_of_turn|> the certain next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 1.0
    out = generate(model, tok, PROMPTS[:2], max_new_tokens=5, do_sample=False)
    assert out.response_ids.shape[1] == 1 and (out.response_ids[:, 0] == tok.eos_token_id).all()
    assert out.response_mask.all() and out.responses == ["", ""]


def test_policy_logprobs_equal_plain_forward(tiny, batch):
    model, _ = tiny
    policy = SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=2)
    with torch.no_grad():
        out = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True, with_values=True)
        expected = full_logprobs(model, batch)
    assert torch.allclose(out["logprobs"], expected, atol=1e-5)
    # before any update the reference is the policy
    assert torch.allclose(out["ref_logprobs"], expected, atol=1e-5)
    assert out["values"].shape == expected.shape and (out["values"] == 0).all()


def test_shared_trunk_reference_equals_a_separate_copy_after_training(tiny, batch):
    model, _ = tiny
    reference = copy.deepcopy(model)                       # what a naive implementation would hold
    policy = SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=2)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    for _ in range(2):
        out = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_values=True)
        loss = -(out["logprobs"] * batch.response_mask).sum() + (out["values"] ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True)
        separate = full_logprobs(reference, batch)
        trained = full_logprobs(policy.model, batch)
    m = batch.response_mask
    assert torch.allclose(out["ref_logprobs"][m], separate[m], atol=1e-5)
    assert torch.allclose(out["logprobs"][m], trained[m], atol=1e-5)
    assert not torch.allclose(out["logprobs"][m], separate[m], atol=1e-3), "the policy did move"


def test_only_top_layers_train_and_reference_is_small(tiny):
    model, _ = tiny
    policy = SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=1, value_head=False)
    layers = policy.model.model.layers
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.model.layers.3.") for n in trainable)
    assert count_parameters(policy.ref_layers) == count_parameters(layers[3])
    total = count_parameters(policy)
    assert total == count_parameters(model) + count_parameters(layers[3])
    with pytest.raises(ValueError, match="num_trainable_layers"):
        SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=5)


def test_per_token_rewards():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    r = per_token_rewards(scores, kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25, -0.25 - 1.0, 0.0]])
    assert torch.allclose(r, expected)


def test_starting_from_the_cached_trunk_gives_the_full_forwards_numbers_and_gradients(tiny, batch):
    model, _ = tiny
    policy = SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=2, value_head=True)
    with torch.no_grad():
        torch.nn.init.normal_(policy.value_head.weight)      # a critic that reads the hidden state
        first = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True,
                       with_values=True, return_trunk=True)
    rows = torch.tensor([2, 0])                               # a micro-batch: some rows, in another order
    args = (batch.input_ids[rows], batch.attention_mask[rows], batch.response_start)
    outs, grads, bottom_calls = [], [], []
    policy.model.model.layers[0].register_forward_hook(lambda *_: bottom_calls.append(1))
    for trunk in (None, first["trunk"][rows]):
        policy.zero_grad(set_to_none=True)
        bottom_calls.clear()
        out = policy(*args, with_ref=True, with_values=True, trunk=trunk)
        assert len(bottom_calls) == (1 if trunk is None else 0)   # from the trunk: the bottom layers do not run
        (out["logprobs"].sum() + out["values"].sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    full, cached = outs
    for key in ("logprobs", "ref_logprobs", "values"):
        assert torch.allclose(cached[key], full[key], atol=1e-5), key
        assert torch.allclose(cached[key], first[key][rows], atol=1e-5), key
    assert grads[0].keys() == grads[1].keys() and any(".layers.3." in n for n in grads[0])
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])
    assert len(policy.model.model.layers) == 4                # the full stack is back after the cached forward


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_the_sampler_keeps_the_trunk_output_that_the_log_prob_pass_needs(tiny, engine):
    """generate(keep_trunk=s) hands out the input of layer s from the sampling itself: at every real
    token it is what a full forward computes there, and the policy's log-probs, reference and values
    from it are the full forward's. model.generate cannot keep it: then the batch says None."""
    model, tok = tiny
    policy = SharedTrunkPolicy(copy.deepcopy(model), num_trainable_layers=2, value_head=True)
    with torch.no_grad():
        torch.nn.init.normal_(policy.value_head.weight)
    torch.manual_seed(1)
    batch = generate(policy.model, tok, PROMPTS, max_new_tokens=12, engine=engine, keep_trunk=policy.split)
    if engine == "hf":
        assert batch.trunk is None
        return
    assert batch.trunk.shape == (*batch.input_ids.shape, policy.model.config.hidden_size)
    with torch.no_grad():
        full = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True, with_values=True,
                      with_entropy=True, return_trunk=True)
        kept = policy(batch.input_ids, batch.attention_mask, batch.response_start, with_ref=True, with_values=True,
                      with_entropy=True, trunk=batch.trunk)
    real = batch.attention_mask.bool().clone()
    real[:, -1] = False                       # the last token is sampled, never fed: its slot holds zeros
    assert torch.allclose(batch.trunk[real], full["trunk"][real], atol=1e-5)
    assert not torch.equal(batch.trunk[real], torch.zeros_like(batch.trunk[real]))
    mask = batch.response_mask
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert torch.allclose(kept[key][mask], full[key][mask], atol=1e-5), key
    # the KL to the reference of an untrained policy stays exactly zero from the kept trunk
    assert torch.equal(kept["logprobs"], kept["ref_logprobs"])


def test_keep_trunk_must_name_a_layer(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="keep_trunk must be a layer index in 0..3, got 4"):
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, engine="fast", keep_trunk=4)
