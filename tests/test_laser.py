"""LaserRMT (starling_lib/laser.py): the threshold and the reduction against hand-computed cases,
perplexity against a hand computation on the tiny model, the search's exact restore and budget,
the config's checks."""

import copy
import math

import pytest
import torch

from starling_lib import laser
from starling_lib.models import decoder_layers, load_model_and_tokenizer


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q  # (n, k)


# --------------------------------------------------------------------------------------------
# threshold and reduction


def test_reference_threshold_and_reduction_by_hand():
    gen = torch.Generator().manual_seed(0)
    s = torch.arange(8, 0, -1, dtype=torch.float64)          # 8, 7, ..., 1
    u, v = orthonormal(8, 8, gen), orthonormal(32, 8, gen)
    w = (u * s) @ v.T                                         # 8 x 32 with exactly these singular values
    # torch.quantile interpolates linearly: q25 at position 1.75 of 1..8 is 2.75, q75 at 5.25 is 6.25
    sigma = (6.25 - 2.75) / 1.349
    edge = sigma * (1 + math.sqrt(8 / 32))                    # 3.8918...
    got_edge, got_sigma = laser.mp_threshold(laser.singular_values(w), 8, 32, "reference")
    assert got_sigma == pytest.approx(sigma) and got_edge == pytest.approx(edge) and edge == pytest.approx(3.89177, abs=1e-4)
    reduced, info = laser.reduce_rank(w, "reference")
    assert (info.rank, info.full_rank) == (5, 8)              # 8, 7, 6, 5, 4 are above 3.89
    assert torch.allclose(reduced, (u[:, :5] * s[:5]) @ v[:, :5].T, atol=1e-12)
    assert info.energy_kept == pytest.approx(sum(x * x for x in range(4, 9)) / sum(x * x for x in range(1, 9)))
    # the input's dtype comes back; the matrix itself is untouched
    r32, _ = laser.reduce_rank(w.float())
    assert r32.dtype == torch.float32 and r32.shape == (8, 32)


def test_mp_law_quartiles_and_edges_by_hand():
    # beta = 1: s / sqrt(n) follows the quarter circle sqrt(4 - x^2) / pi on [0, 2], whose CDF is
    # (x sqrt(4 - x^2) / 2 + 2 asin(x / 2)) / pi; its quartiles solved by bisection here.
    def cdf(x):
        return (x * math.sqrt(4 - x * x) / 2 + 2 * math.asin(x / 2)) / math.pi

    def solve(q, lo=0.0, hi=2.0):
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
        return lo

    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert laser.mp_singular_value_quantile(q, 1.0) == pytest.approx(solve(q), abs=1e-6)
    assert laser.mp_iqr(1.0) == pytest.approx(solve(0.75) - solve(0.25), abs=1e-6)
    for beta in (1.0, 0.375, 0.1):
        assert laser.mp_singular_value_quantile(0.0, beta) == pytest.approx(1 - math.sqrt(beta), abs=1e-9)
        assert laser.mp_singular_value_quantile(1.0, beta) == pytest.approx(1 + math.sqrt(beta), abs=1e-9)
        x = torch.linspace(0, 2.5, 200001, dtype=torch.float64).numpy()
        mass = float(((laser.mp_singular_value_density(x, beta)[1:] + laser.mp_singular_value_density(x, beta)[:-1]) / 2).sum()
                     * (x[1] - x[0]))
        assert mass == pytest.approx(1.0, abs=2e-3)
    assert laser.mp_edge(2.0, 100, 400) == pytest.approx(3.0)   # 2 (1 + sqrt(1/4))
    with pytest.raises(ValueError):
        laser.mp_threshold(torch.ones(3, dtype=torch.float64), 3, 3, "median")


@pytest.mark.parametrize("shape", [(300, 600), (600, 300), (400, 400)])
def test_low_rank_plus_noise_keeps_the_true_rank(shape):
    n, m = shape
    sigma, rank = 0.1, 5
    gen = torch.Generator().manual_seed(n + m)
    edge = sigma * (math.sqrt(n) + math.sqrt(m))              # the true Marchenko-Pastur edge
    signal = torch.linspace(3.0, 1.5, rank, dtype=torch.float64) * edge
    w = (orthonormal(n, rank, gen) * signal) @ orthonormal(m, rank, gen).T \
        + sigma * torch.randn(n, m, generator=gen, dtype=torch.float64)
    reduced, info = laser.reduce_rank(w, "calibrated")
    assert info.rank == rank
    assert info.edge == pytest.approx(edge, rel=0.03)          # the IQR read off the spectrum finds sigma
    assert torch.linalg.matrix_rank(reduced) == rank
    # the reference rule's Gaussian constant puts its edge inside the noise: it keeps far more
    assert laser.reduce_rank(w, "reference")[1].rank > 10 * rank


@pytest.mark.parametrize("shape,seed", [((576, 1536), 0), ((1536, 576), 1), ((192, 576), 2), ((500, 500), 3)])
def test_pure_noise_keeps_almost_nothing(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    calibrated = laser.reduce_rank(w, "calibrated")[1]
    assert calibrated.rank <= 2                                # of min(n, m) = 192 .. 576
    reference = laser.reduce_rank(w, "reference")[1]
    assert reference.rank > 0.2 * reference.full_rank          # the departure the module docstring measures


# --------------------------------------------------------------------------------------------
# perplexity


@pytest.fixture(scope="module")
def docs(tiny):
    _, tokenizer = tiny
    text = laser.nectar_corpus(tokenizer, search_tokens=600, heldout_tokens=600, document_tokens=150)
    return text


def hand_nll(model, ids: list[int], begin: int, end: int, first: int) -> tuple[float, int]:
    """NLL of tokens first..end-1 given the window begin..end-1, one plain forward."""
    x = torch.tensor([ids[begin:end]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)   # (T, V)
    return -sum(float(logp[t - begin - 1, ids[t]]) for t in range(first, end)), end - first


def test_windows():
    assert laser.make_windows(list(range(10)), 4) == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
    # sliding: every token but the first is scored once, with the window before it as context
    assert laser.make_windows(list(range(10)), 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert laser.make_windows([5], 4) == [] and laser.make_windows([], 4) == []


def test_perplexity_matches_a_hand_computation(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(5, 4000, (40,), generator=gen).tolist()
    b = torch.randint(5, 4000, (23,), generator=gen).tolist()
    # fixed windows of 16: a -> [0,16) [16,32) [32,40), b -> [0,16) [16,23); each scores all but its first token
    nll = tok = 0
    by_doc = []
    for doc in (a, b):
        parts = [hand_nll(model, doc, s, min(s + 16, len(doc)), s + 1) for s in range(0, len(doc), 16)]
        by_doc.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
    nll, tok = sum(d[0] for d in by_doc), sum(d[1] for d in by_doc)
    for batch_size in (1, 3):   # padding on the right changes nothing
        got = laser.PerplexityEvaluator(model, [a, b], window=16, batch_size=batch_size)()
        assert got.tokens == [39 - 2, 22 - 1] and got.num_tokens == tok
        assert got.nll == pytest.approx([d[0] for d in by_doc], rel=1e-5)
        assert got.ppl == pytest.approx(math.exp(nll / tok), rel=1e-5)
    # sliding windows of 16 every 8 tokens: token t >= 1 of a scored once
    hand = [hand_nll(model, a, s, e, s + f) for s, e, f in laser.make_windows(a, 16, 8)]
    assert sum(h[1] for h in hand) == len(a) - 1
    got = laser.PerplexityEvaluator(model, [a], window=16, stride=8)()
    assert got.nll[0] == pytest.approx(sum(h[0] for h in hand), rel=1e-5) and got.tokens == [39]


def test_standard_errors_by_hand():
    r = laser.PerplexityResult(nll=[2.0, 6.0, 4.0], tokens=[1, 2, 2])
    mean = 12.0 / 5
    resid = (2 - mean) ** 2 + (6 - 2 * mean) ** 2 + (4 - 2 * mean) ** 2
    assert r.mean_nll == pytest.approx(mean) and r.ppl == pytest.approx(math.exp(mean))
    assert r.mean_nll_se == pytest.approx(math.sqrt(resid / 6) / (5 / 3))
    assert r.ppl_se == pytest.approx(math.exp(mean) * r.mean_nll_se)
    after = laser.PerplexityResult(nll=[1.5, 5.0, 4.5], tokens=[1, 2, 2])
    change = laser.paired_change(r, after)
    assert change["nll_change"] == pytest.approx(-1.0 / 5)
    assert change["relative_change"] == pytest.approx(math.exp(-0.2) - 1)
    assert laser.paired_change(r, r)["relative_change_se"] == 0.0
    assert math.isnan(laser.PerplexityResult(nll=[1.0], tokens=[3]).ppl_se)
    with pytest.raises(ValueError):
        laser.paired_change(r, laser.PerplexityResult(nll=[1.0], tokens=[5]))


def test_the_trunk_cache_is_exact_and_follows_changes_above_it(tiny, docs):
    model = copy.deepcopy(tiny[0])
    full = laser.PerplexityEvaluator(model, docs.search, window=64, batch_size=4)
    cached = laser.PerplexityEvaluator(model, docs.search, window=64, batch_size=4, frozen_below=2)
    assert cached().nll == pytest.approx(full().nll, rel=1e-5)      # first call: computes the trunk
    weight = laser.layer_matrix(model, 3, "mlp.down_proj")
    with torch.no_grad():
        weight.copy_(laser.reduce_rank(weight)[0])
    assert cached().nll == pytest.approx(full().nll, rel=1e-5)      # reused trunk, changed top layer
    assert cached._trunk is not None and cached.calls == 2


def test_window_longer_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="context"):
        laser.PerplexityEvaluator(tiny[0], [[1, 2, 3]], window=4096)   # the tiny model reads 2048
    with pytest.raises(ValueError, match="stride"):
        laser.PerplexityEvaluator(tiny[0], [[1, 2, 3]], window=8, stride=8)
    with pytest.raises(ValueError, match="nothing to score"):
        laser.PerplexityEvaluator(tiny[0], [[1]], window=8)


def test_nectar_corpus_is_split_by_prompt_within_its_budgets(tiny):
    from starling_lib.data import load_nectar, split_by_prompt

    _, tokenizer = tiny
    text = laser.nectar_corpus(tokenizer, search_tokens=1000, heldout_tokens=2000, document_tokens=100)
    assert sum(map(len, text.search)) == 1000 and sum(map(len, text.heldout)) == 2000
    assert max(map(len, text.search + text.heldout)) <= 100 and len(text.heldout) >= 20
    split = split_by_prompt(load_nectar("bundled"), 0.5)
    assert not set(split["train"]["prompt"]) & set(split["test"]["prompt"])
    assert text.search[0][0] == tokenizer.bos_token_id                      # the chat template's <s>
    assert len(text.heldout_prompts) == len(split["test"]) and text.heldout_prompts[0][-1]["role"] == "user"
    with pytest.raises(ValueError, match="corpus"):
        laser.load_corpus("c4", tokenizer, window=64)


# --------------------------------------------------------------------------------------------
# the search


class Scripted:
    """An evaluator returning the perplexities of a script, one per call."""

    def __init__(self, ppls):
        self.ppls = list(ppls)

    def __call__(self):
        return laser.PerplexityResult(nll=[math.log(self.ppls.pop(0)) * 10], tokens=[10])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_search_restores_every_rejected_matrix_bit_for_bit(tiny, docs):
    model = copy.deepcopy(tiny[0])
    before = snapshot(model)
    cfg = laser.LaserConfig(top_layers=2, window=64, batch_size=4, progress=False)
    evaluator = laser.PerplexityEvaluator(model, docs.search, window=64, batch_size=4, frozen_below=2)
    result = laser.laser_search(model, evaluator, cfg)
    assert [(a.layer, a.matrix) for a in result.attempts] == [(l, m) for l in (3, 2) for m in cfg.matrices]
    after = model.state_dict()
    changed = set()
    for a in result.attempts:
        name = f"model.layers.{a.layer}.{a.matrix}.weight"
        if a.accepted:
            changed.add(name)
            assert torch.equal(after[name], laser.reduce_rank(before[name], cfg.threshold)[0])
            assert torch.equal(result.originals[(a.layer, a.matrix)], before[name])
        else:
            assert torch.equal(after[name], before[name]), f"{name} was not restored exactly"
    for name, value in before.items():
        if name not in changed:
            assert torch.equal(after[name], value), name
    # the log: each attempt is judged against the model with every earlier accepted change
    current = result.initial.ppl
    for a in result.attempts:
        assert a.ppl_before == pytest.approx(current) and a.accepted == (a.ppl_after < current)
        current = a.ppl_after if a.accepted else current
    assert result.final.ppl == pytest.approx(current) and evaluator.calls == 1 + len(result.attempts)


def test_acceptance_rule_and_restore_with_a_scripted_perplexity(tiny):
    model = copy.deepcopy(tiny[0])
    before = snapshot(model)
    cfg = laser.LaserConfig(top_layers=1, matrices="mlp.down_proj, self_attn.o_proj, self_attn.q_proj", progress=False)
    assert cfg.matrices == ("mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj")
    result = laser.laser_search(model, Scripted([10.0, 9.0, 9.5, 8.0]), cfg)
    assert [a.accepted for a in result.attempts] == [True, False, True]
    assert [a.ppl_before for a in result.attempts] == pytest.approx([10.0, 9.0, 9.0])
    after = model.state_dict()
    assert torch.equal(after["model.layers.3.self_attn.o_proj.weight"], before["model.layers.3.self_attn.o_proj.weight"])
    assert not torch.equal(after["model.layers.3.mlp.down_proj.weight"], before["model.layers.3.mlp.down_proj.weight"])
    # min_improvement: a fall of 5% is not enough when 10% is asked for
    model = copy.deepcopy(tiny[0])
    strict = laser.LaserConfig(top_layers=1, matrices=("mlp.down_proj",), min_improvement=0.1, progress=False)
    assert not laser.laser_search(model, Scripted([10.0, 9.5]), strict).attempts[0].accepted


def test_budget_is_respected(tiny):
    model = copy.deepcopy(tiny[0])
    cfg = laser.LaserConfig(top_layers=2, max_modifications=2, progress=False)
    result = laser.laser_search(model, Scripted([10.0 - i for i in range(13)]), cfg)   # every change helps
    assert len(result.accepted) == 2 and len(result.attempts) == 2 and result.stopped_by_budget
    unlimited = laser.laser_search(copy.deepcopy(tiny[0]), Scripted([100.0 - i for i in range(13)]),
                                   laser.LaserConfig(top_layers=2, progress=False))
    assert len(unlimited.accepted) == 12 and not unlimited.stopped_by_budget


def test_nothing_to_cut_is_logged_and_not_tried(tiny):
    model = copy.deepcopy(tiny[0])
    weight = laser.layer_matrix(model, 3, "self_attn.o_proj")
    with torch.no_grad():   # all singular values equal: IQR 0, the edge at 0, every value kept
        weight.copy_(orthonormal(256, 256, torch.Generator().manual_seed(0)).float())
    result = laser.laser_search(model, Scripted([10.0]), laser.LaserConfig(top_layers=1, matrices=("self_attn.o_proj",),
                                                                            progress=False))
    (a,) = result.attempts
    assert a.ppl_after is None and not a.accepted and a.rank == a.full_rank and "nothing to cut" in a.note


def test_original_weights_swap_back_and_forth_exactly(tiny):
    model = copy.deepcopy(tiny[0])
    before = snapshot(model)
    result = laser.laser_search(model, Scripted([10.0, 9.0, 8.0]),
                                laser.LaserConfig(top_layers=1, matrices=("mlp.up_proj", "self_attn.v_proj"), progress=False))
    modified = snapshot(model)
    with laser.original_weights(model, result):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, modified[k]) for k, v in model.state_dict().items())


def test_layers_are_chosen_by_index(tiny):
    model = tiny[0]
    assert laser.searched_layers(model, laser.LaserConfig(top_layers=2)) == [3, 2]
    assert laser.searched_layers(model, laser.LaserConfig(top_layers=4)) == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="only 4 decoder layers"):
        laser.searched_layers(model, laser.LaserConfig(top_layers=5))
    assert laser.layer_matrix(model, 1, "mlp.down_proj") is decoder_layers(model)[1].mlp.down_proj.weight
    with pytest.raises(ValueError, match="has no"):
        laser.layer_matrix(model, 1, "mlp.fc1")
    # an evaluator that reuses blocks the search would change is refused
    stale = laser.PerplexityEvaluator(model, [[1, 2, 3, 4]], window=4, frozen_below=3)
    with pytest.raises(ValueError, match="frozen_below"):
        laser.laser_search(copy.deepcopy(model), stale, laser.LaserConfig(top_layers=2, progress=False))


@pytest.mark.parametrize("field,value", [
    ("top_layers", 0), ("top_layers", 2.0), ("top_layers", True), ("matrices", ()), ("matrices", ("mlp.fc1",)),
    ("matrices", ("mlp.up_proj", "mlp.up_proj")), ("threshold", "median"), ("max_modifications", -1),
    ("min_improvement", 1.0), ("min_improvement", -0.1), ("window", 1), ("stride", 384), ("stride", -1),
    ("batch_size", 0), ("cache_trunk", "yes"), ("progress", 1)])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValueError) as err:
        laser.LaserConfig(**{field: value})
    message = str(err.value)
    assert f"LaserConfig.{field}" in message and repr(value if field != "matrices" else tuple(value)) in message
    assert "must be" in message


def test_saved_model_loads_by_path_with_the_modified_weights(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    result = laser.laser_search(model, Scripted([10.0, 9.0, 11.0]),
                                laser.LaserConfig(top_layers=1, matrices=("mlp.down_proj", "self_attn.q_proj"), progress=False))
    path = laser.save_laser_model(model, tiny[1], tmp_path / "model", result, source="tiny")
    assert laser.check_saved(model, path, result).iloc[:, -1].tolist() == [True]
    reloaded, tokenizer = load_model_and_tokenizer(str(path), device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert tokenizer.chat_template == tiny[1].chat_template and (path / "laser.json").is_file()


def test_metrics_are_namespaced(tiny):
    model = copy.deepcopy(tiny[0])
    result = laser.laser_search(model, Scripted([10.0, 9.0]), laser.LaserConfig(top_layers=1, matrices=("mlp.up_proj",),
                                                                                 progress=False))
    held = laser.PerplexityResult(nll=[2.0, 3.0], tokens=[1, 1])
    text = laser.Corpus("nectar", [[1, 2]], [[1, 2]], "test")
    m = laser.laser_metrics(result, heldout_initial=held, heldout_final=held, corpus=text, model_name="tiny")
    assert all(k.startswith("laser/") for k in m) and m["laser/accepted"] == 1
    assert m["laser/search/relative_change"] == pytest.approx(-0.1) and m["laser/heldout/relative_change"] == 0.0
    assert m["laser/selection_gap"] == pytest.approx(0.1)
