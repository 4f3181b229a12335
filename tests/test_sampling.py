"""The rollout sampler with a preallocated KV cache (starling_lib.sampling) against `generate`."""

import copy
import math

import pytest
import torch

from starling_lib.chat import stop_token_ids
from starling_lib.rollout import generate
from starling_lib.sampling import filter_logits, sample, supports_fast_sampling


def left_padded(tok, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, tok.vocab_size - 10, (n, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0          # rows of different lengths: the first two left-padded
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_equal_generate(tiny, attn):
    model, tok = tiny
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    ids, mask = left_padded(tok)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    ours = sample(model, ids, mask, 20, [tok.eos_token_id], tok.pad_token_id, do_sample=False)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_equal_generate_in_the_policys_mixed_precision(tiny, attn):
    """As policy.online.load_policy holds the 7B: frozen layers in bf16, the trained top layers in float32,
    run under bf16 autocast. bf16 rounds coarsely, so any difference in arithmetic shows as tokens."""
    model, tok = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    for layer in model.model.layers[2:]:
        layer.float()
    model.config._attn_implementation = attn
    for seed in range(3):
        ids, mask = left_padded(tok, seed=seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                 eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
            ours = sample(model, ids, mask, 20, [tok.eos_token_id], tok.pad_token_id, do_sample=False)
        assert torch.equal(ours, ref), seed


def test_rows_after_their_stop_token_are_padded_and_the_loop_ends_when_all_stopped(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    ids, mask = left_padded(tok)

    def stop_now(module, args, logits):   # make the stop token certain at every step
        return torch.full_like(logits, -1e4).index_fill_(-1, torch.tensor([tok.eos_token_id]), 1e4)

    model.lm_head.register_forward_hook(stop_now)
    out = sample(model, ids, mask, 10, stop_token_ids(tok), tok.pad_token_id)
    assert out.shape == (3, 9 + 1)                       # everyone stopped at once: no more steps
    assert (out[:, -1] == tok.eos_token_id).all()


def test_checking_for_stopped_rows_less_often_gives_the_same_output(tiny):
    """As on a GPU (a check every 16 tokens): rows that stop at different steps, cut where the last stopped."""
    model, tok = tiny
    model = copy.deepcopy(model)
    ids, mask = left_padded(tok, n=6)
    stops = stop_token_ids(tok)

    def likely_stop(module, args, logits):   # the stop token about one time in ten
        return logits.index_add(-1, torch.tensor([tok.eos_token_id]), torch.full_like(logits[..., :1], 6.0))

    model.lm_head.register_forward_hook(likely_stop)
    lengths = set()
    for seed in range(4):
        every_token = sample(model, ids, mask, 40, stops, tok.pad_token_id,
                             generator=torch.Generator().manual_seed(seed))
        rarely = sample(model, ids, mask, 40, stops, tok.pad_token_id,
                        generator=torch.Generator().manual_seed(seed), stop_check_every=16)
        assert torch.equal(rarely, every_token)
        response = every_token[:, ids.shape[1]:]
        stopped_at = [row.tolist().index(tok.eos_token_id) for row in response if tok.eos_token_id in row]
        lengths.add(response.shape[1])
        assert len(set(stopped_at)) > 1   # rows stopped at different steps
    assert any(n < 40 and n % 16 for n in lengths)   # a run ended between two checks: the cut mattered


def test_sampling_follows_the_softmax(tiny):
    """Frequencies of the first sampled token match softmax(logits / T) of a plain forward."""
    model, tok = tiny
    ids = torch.tensor([[tok.bos_token_id, 100, 200, 300]])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1] / 0.7, -1)
    torch.manual_seed(0)
    n = 4000
    firsts = sample(model, ids.expand(n, -1), torch.ones(n, 4, dtype=torch.long), 1, [], tok.pad_token_id,
                    temperature=0.7)[:, -1]
    top = p.argsort(descending=True)[:3]
    for t in top:
        freq = (firsts == t).float().mean().item()
        assert abs(freq - p[t].item()) < 4 * math.sqrt(p[t].item() * (1 - p[t].item()) / n) + 1e-3


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert filter_logits(logits, top_k=2)[0].isinf().tolist() == [False, False, False, True]   # a tie at the k-th stays
    assert torch.isinf(filter_logits(logits, top_k=1)[0, 1:]).all()
    # nucleus 0.6: 0.5 alone is not enough, 0.5 + 0.2 is; the second 0.2 (and 0.1) go
    kept = ~torch.isinf(filter_logits(logits, top_p=0.6)[0])
    assert kept.sum() == 2 and kept[0]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    assert kept.tolist() == (~torch.isinf(filter_logits(logits, top_p=0.5 + 1e-6)[0])).tolist()


def test_rollout_generate_engines_agree_greedily_and_fall_back(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Tell me about the moon."}]]
    fast = generate(model, tok, prompts, max_new_tokens=8, do_sample=False, engine="fast")
    hf = generate(model, tok, prompts, max_new_tokens=8, do_sample=False, engine="hf")
    assert torch.equal(fast.input_ids, hf.input_ids) and fast.responses == hf.responses
    assert supports_fast_sampling(model)
    windowed = copy.deepcopy(model)
    windowed.config.sliding_window = 64
    assert supports_fast_sampling(windowed, total_length=64)
    assert not supports_fast_sampling(windowed, total_length=65)   # past the window: generate's business
    with pytest.raises(ValueError, match="engine must be one of"):
        generate(model, tok, prompts, engine="sglang")


def test_sampling_never_picks_a_filtered_token(tiny):
    """top_k=1 leaves one token of probability 1: sampling must then be greedy decoding."""
    model, tok = tiny
    ids, mask = left_padded(tok)
    greedy = sample(model, ids, mask, 12, [tok.eos_token_id], tok.pad_token_id, do_sample=False)
    torch.manual_seed(0)
    assert torch.equal(sample(model, ids, mask, 12, [tok.eos_token_id], tok.pad_token_id, top_k=1), greedy)


FSDP2_SCRIPT = """
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from starling_lib.models import load_model_and_tokenizer
from starling_lib.rollout import generate
from starling_lib.sampling import supports_fast_sampling
dist.init_process_group("gloo", rank=0, world_size=1)
model, tok = load_model_and_tokenizer("tiny", device="cpu", num_hidden_layers=2)
assert supports_fast_sampling(model)
for layer in model.model.layers:   # as accelerate's TRANSFORMER_BASED_WRAP shards it
    fully_shard(layer)
fully_shard(model)
assert not supports_fast_sampling(model)
batch = generate(model.eval(), tok, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)
assert batch.input_ids.shape[1] > batch.response_start
print("OK")
dist.destroy_process_group()
"""


def test_auto_engine_falls_back_to_generate_under_fsdp2(run_distributed_script):
    """FSDP2 gathers a block's weights around the block's forward, which the fast loop bypasses."""
    out = run_distributed_script(FSDP2_SCRIPT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_hooked_projections_are_called_through_their_modules(tiny):
    """The loop calls F.linear directly only on plain nn.Linear layers; a hooked one keeps its forward."""
    model, tok = tiny
    ids, mask = left_padded(tok)
    plain = sample(model, ids, mask, 5, [], tok.pad_token_id, do_sample=False)
    calls = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    try:
        hooked = sample(model, ids, mask, 5, [], tok.pad_token_id, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(hooked, plain)
    assert len(calls) == 5   # the prefill and 4 decoding steps (the 5th token needs no forward)


def test_per_row_temperatures(tiny):
    """A (B,) temperature tensor: the same draws as one temperature for all rows, and rows at 0 greedy."""
    model, tok = tiny
    ids, mask = left_padded(tok)
    stops, pad = [tok.eos_token_id], tok.pad_token_id
    torch.manual_seed(5)
    scalar = sample(model, ids, mask, 10, stops, pad, temperature=0.7)
    torch.manual_seed(5)
    per_row = sample(model, ids, mask, 10, stops, pad, temperature=torch.tensor([0.7, 0.7, 0.7]))
    assert torch.equal(per_row, scalar)
    greedy = sample(model, ids, mask, 10, stops, pad, do_sample=False)
    torch.manual_seed(5)
    mixed = sample(model, ids, mask, 10, stops, pad, temperature=torch.tensor([0.0, 0.7, 0.0]))
    assert torch.equal(mixed[[0, 2]], greedy[[0, 2]]) and torch.equal(mixed[1], scalar[1])
    assert not torch.equal(greedy[1], scalar[1])
    all_zero = sample(model, ids, mask, 10, stops, pad, temperature=torch.zeros(3))
    assert torch.equal(all_zero, greedy)


def test_distinct_rows_by_hand():
    from starling_lib.sampling import distinct_rows
    ids = torch.tensor([[5, 6], [1, 2], [5, 6], [1, 2], [0, 6]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    first, inverse = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 4]          # in order of first appearance
    assert inverse.tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(ids[first][inverse], ids)
    assert distinct_rows(ids[:1], mask[:1])[0].tolist() == [0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_repeated_prompts_share_one_prefill_with_the_same_results(tiny, attn):
    """A prompt sampled several times (responses_per_prompt, evaluation samples) is prefilled once:
    the rows get the tokens and trunk outputs they get when every row is prefilled on its own."""
    model, tok = tiny
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    ids, mask = left_padded(tok)
    rep = torch.tensor([0, 1, 0, 2, 1, 0])
    rows_embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows_embedded.append(out.shape[:2]))
    greedy = sample(model, ids[rep], mask[rep], 12, [tok.eos_token_id], tok.pad_token_id, do_sample=False)
    hook.remove()
    assert rows_embedded[1] == (3, 9)   # the prefill (after a 1 x 1 call for the rotary dtype): 3 distinct prompts
    alone = torch.cat([sample(model, ids[i:i + 1], mask[i:i + 1], 12, [tok.eos_token_id], tok.pad_token_id,
                              do_sample=False) for i in range(3)])
    assert torch.equal(greedy, alone[rep][:, :greedy.shape[1]])

    gen = torch.Generator().manual_seed(3)
    out, trunk = sample(model, ids[rep], mask[rep], 12, [tok.eos_token_id], tok.pad_token_id, generator=gen,
                        keep_trunk=2)
    full_mask = torch.cat([mask[rep], torch.ones(len(rep), out.shape[1] - ids.shape[1], dtype=torch.long)], 1)
    full = model(out, attention_mask=full_mask, output_hidden_states=True).hidden_states[2]   # input of layer 2
    real = full_mask.bool()
    real[:, -1] = False   # the last position is never run
    torch.testing.assert_close(trunk[real], full[real], atol=1e-5, rtol=1e-4)
    assert len({tuple(r) for r in out[rep == 0].tolist()}) > 1   # one prompt's rows still draw their own tokens
