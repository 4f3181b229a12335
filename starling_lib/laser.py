"""LaserRMT: layer-selective rank reduction by random-matrix theory, and a perplexity to judge it by.

One of the Starling derivatives was made from Starling-LM-7B-beta with LaserRMT
(cognitivecomputations/laserRMT, `rmt_laser.py`; after LASER, Sharma, Ash and Misra 2023,
arXiv:2312.13558) "on the top 5 layers": perplexity 12.1966 -> 11.8436, 11 modifications
(`PUBLISHED`). No weight is trained. For each candidate matrix W (n x m) of a decoder layer:

    W = U S V^T                                  (SVD; S descending)
    sigma = IQR(S) / 1.349                       (the noise scale, read off the spread of S)
    edge = sigma (1 + sqrt(beta)),  beta = min(n, m) / max(n, m)   (the Marchenko-Pastur edge)
    W' = U diag(S * [S > edge]) V^T              (keep only the singular values above the edge)

and the change is kept only if the model's perplexity falls, else W is put back. The search goes
from the top layer down, trying the matrix types in a fixed order, and stops after a budget of
accepted changes.

    cfg = LaserConfig(top_layers=5)
    layers = searched_layers(model, cfg)                         # [31, 30, 29, 28, 27] on a 32-layer model
    search = PerplexityEvaluator(model, corpus.search, window=cfg.window, frozen_below=min(layers))
    result = laser_search(model, search, cfg)                    # the model is modified in place
    attempts_frame(result)                                       # layer, matrix, rank kept of full, ppl before/after, accepted

The pure pieces take and return tensors: `iqr_noise_scale`, `mp_edge`, `mp_threshold`,
`reduce_rank`, and the Marchenko-Pastur law of a pure-noise matrix's singular values
(`mp_singular_value_density`, `mp_singular_value_quantile`). `PerplexityEvaluator` is a
token-weighted perplexity over fixed or sliding windows with a standard error over documents;
`nectar_corpus` and `wikitext2_corpus` build its text. `original_weights(model, result)` puts the
weights from before the search back for the length of a `with` block (bit for bit, both ways),
`save_laser_model` writes the modified model as a transformers folder.

Departures from the reference, and what they do:
- **Search on one split, report on another.** The reference accepts a change when the perplexity
  of its evaluation text falls and reports the perplexity of that same text, so its "improved
  perplexity" includes selection noise: of many near-neutral changes, those that happen to help
  on that text are kept. Here the decisions are made on a search split and the result is also
  reported on a held-out split (Nectar: disjoint by prompt; wikitext-2: validation to search,
  test to report), with paired standard errors; notebook 06 prints the gap (`laser/selection_gap`).
  Measured on the demo (SmolLM2-135M-Instruct, top 5 layers, reference rule, 1,024 search tokens
  in 4 documents, 2,048 held-out tokens in 9; one run): 6 of 30 changes accepted, all attention
  projections (k, o, v); search split -1.74% +- 0.39%, held-out split -2.13% +- 0.57%. With
  1,536 / 3,072 tokens: 7 accepted, -2.43% +- 1.04% and -2.15% +- 0.59%. So on this model the
  gain holds on held-out text and the selection effect is within the noise; it is not zero by
  construction, and on a near-neutral model it can be all of the "gain". (The demo's weights are
  Q4_1-quantised; whether part of what LaserRMT removes there is quantisation noise was not measured.)
- **Layers by index.** The reference finds a layer by substring match of its number in module
  names (so "1" also matches 10-19, 21, 31 ...; hence its ".1." spelling); here the decoder blocks
  are indexed (`models.decoder_layers`) and the matrix is the block's attribute path.
- **Exact restore.** A rejected matrix is copied back into the same Parameter from a saved copy,
  bit for bit (the reference assigns a new Parameter, which also breaks weight sharing); tested.
- **Perplexity.** Token-weighted over all scored tokens, with a standard error over documents;
  windows never exceed the model's context; fixed windows (the reference's, 384 tokens) or
  sliding ones. On a GPU the reference's wikitext-2 is used (not its c4 and ptb: the card's 12.1966
  is on its three sets together, so our wikitext-2 figure is not the same number).
- **Calibrated threshold (optional, `threshold="calibrated"`).** IQR(S)/1.349 is the noise scale
  of *Gaussian numbers*, not of a noise matrix's singular values, whose spread the
  Marchenko-Pastur law fixes. With it the "edge" lies inside the noise bulk: measured on
  576 x 1536 Gaussian matrices, the reference keeps about 84% of a pure-noise matrix's singular
  values (23% for a square one), where the true edge keeps none. `"calibrated"` divides IQR(S) by
  the MP law's own interquartile range instead, so the edge is where a pure-noise matrix's
  spectrum ends (tests/test_laser.py: a low-rank matrix plus noise keeps exactly its rank). The
  default stays the reference's rule, which is what the card's figure comes from. On the demo's
  30 candidates the reference rule keeps 46.6% of the singular values, the calibrated one 2.6%
  (measured; a search with the calibrated rule was not run here).
- **A no-op is not tried.** When the rule keeps every singular value the matrix would only be
  rebuilt with rounding error; the reference evaluates and may "accept" that. It is logged here
  as not tried.
- **The SVD runs in float64 on every device** (the reference: float64 on CUDA, float32 elsewhere).
- **Only the blocks from the lowest searched layer up run per evaluation** (`frozen_below`): the
  blocks below never change in the search, so their output is computed once (exact; tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from starling_lib.models import decoder_layers, top_layers_from, trunk_output

LASER_STAGE = "06_laser_rank_reduction"   # the notebook's folder in a run; the modified model is in LASER_STAGE/model

# The model card of the LaserRMT derivative of Starling-LM-7B-beta: perplexity before and after,
# accepted modifications, on the top 5 layers (rmt_laser.py's default text: wikitext-2, c4, ptb).
PUBLISHED = {"model": "Nexusflow/Starling-LM-7B-beta", "top_layers": 5, "ppl_initial": 12.196647644042969,
             "ppl_final": 11.843605995178223, "modifications": 11}

# The matrix types of a Llama/Mistral decoder block, as attribute paths from the block. The
# reference tries the first six, in this order; gate_proj is allowed but not in its list.
REFERENCE_MATRICES = ("mlp.down_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj")
MATRIX_TYPES = REFERENCE_MATRICES + ("mlp.gate_proj",)
THRESHOLDS = ("reference", "calibrated")
GAUSSIAN_IQR = 1.349   # interquartile range of a standard normal, 2 x 0.6745: the reference's constant


# --------------------------------------------------------------------------------------------
# the configuration


@dataclass(frozen=True)
class LaserConfig:
    """Settings of a LaserRMT search and of the perplexity it is judged by. Checked on construction."""

    top_layers: int = 5
    """Decoder layers searched, counted from the top: 5 searches the top 5, from the highest down
    (the card's setting)."""

    matrices: tuple[str, ...] = REFERENCE_MATRICES
    """Matrix types tried in each layer, in this order (the reference's: down, up, q, k, v, o);
    any of MATRIX_TYPES. A comma-separated string is accepted too."""

    threshold: str = "reference"
    """How the noise scale is read off the singular values: "reference" (IQR(S) / 1.349, as
    rmt_laser.py) or "calibrated" (IQR(S) over the Marchenko-Pastur law's own interquartile range,
    so that the edge is where a pure-noise matrix's spectrum ends)."""

    max_modifications: int = 0
    """Stop after this many accepted changes; 0 means no limit (the reference's default is 5; the
    card reports 11 on 30 candidates)."""

    min_improvement: float = 0.0
    """Accept only when the perplexity falls by more than this fraction of its current value; 0 is
    the reference's rule (any fall)."""

    window: int = 384
    """Tokens per perplexity window (the reference's seqlen); at most the model's context length."""

    stride: int = 0
    """0: fixed, non-overlapping windows, each scoring all its tokens but the first (the
    reference's); 1 to window - 1: sliding windows, each scoring `stride` new tokens with the
    tokens before them as context."""

    batch_size: int = 8
    """Windows per forward pass."""

    cache_trunk: bool = True
    """Run the blocks below the lowest searched layer once and reuse their output in every
    evaluation (exact: they never change in the search). Needs a Llama/Mistral-style body."""

    progress: bool = True
    """Show a progress bar over the attempts."""

    def __post_init__(self):
        matrices = self.matrices
        if isinstance(matrices, str):
            matrices = tuple(m.strip() for m in matrices.split(",") if m.strip())
        object.__setattr__(self, "matrices", tuple(matrices))
        _check(isinstance(self.top_layers, int) and not isinstance(self.top_layers, bool) and self.top_layers >= 1,
               "top_layers", self.top_layers, "an integer of at least 1")
        _check(len(self.matrices) > 0 and all(m in MATRIX_TYPES for m in self.matrices), "matrices", self.matrices,
               f"a non-empty selection of {', '.join(MATRIX_TYPES)}")
        _check(len(set(self.matrices)) == len(self.matrices), "matrices", self.matrices, "each type at most once")
        _check(self.threshold in THRESHOLDS, "threshold", self.threshold, f"one of {', '.join(THRESHOLDS)}")
        _check(_is_int(self.max_modifications) and self.max_modifications >= 0, "max_modifications",
               self.max_modifications, "an integer of at least 0 (0 means no limit)")
        _check(isinstance(self.min_improvement, (int, float)) and not isinstance(self.min_improvement, bool)
               and 0.0 <= self.min_improvement < 1.0, "min_improvement", self.min_improvement, "a number in [0, 1)")
        _check(_is_int(self.window) and self.window >= 2, "window", self.window, "an integer of at least 2")
        _check(_is_int(self.stride) and 0 <= self.stride < self.window, "stride", self.stride,
               f"0 (fixed windows) or 1 to window - 1 = {self.window - 1} (sliding windows)")
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size, "an integer of at least 1")
        _check(isinstance(self.cache_trunk, bool), "cache_trunk", self.cache_trunk, "True or False")
        _check(isinstance(self.progress, bool), "progress", self.progress, "True or False")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"LaserConfig.{name} = {value!r}: must be {allowed}")


# --------------------------------------------------------------------------------------------
# the pure pieces: noise scale, Marchenko-Pastur edge, rank reduction


def iqr_noise_scale(s: torch.Tensor, constant: float = GAUSSIAN_IQR) -> torch.Tensor:
    """() tensor: IQR(s) / constant for singular values s (k,); torch.quantile's linear interpolation,
    as the reference. The default constant 1.349 is a standard normal's IQR (the reference's)."""
    q75, q25 = torch.quantile(s, torch.tensor([0.75, 0.25], dtype=s.dtype, device=s.device))
    return (q75 - q25) / constant


def aspect_ratio(n: int, m: int) -> float:
    """beta = min(n, m) / max(n, m), in (0, 1]."""
    return min(n, m) / max(n, m)


def mp_edge(scale: float | torch.Tensor, n: int, m: int):
    """The Marchenko-Pastur edge scale * (1 + sqrt(beta)) of an n x m matrix: the largest singular
    value of pure noise whose singular values, divided by sqrt(max(n, m)), have scale `scale`."""
    return scale * (1.0 + math.sqrt(aspect_ratio(n, m)))


@lru_cache(maxsize=256)
def _mp_sqrt_cdf(beta: float, points: int = 8193):
    """(x, F(x)) on a grid: the limiting CDF of s / sqrt(max(n, m)) for the singular values s of an
    n x m matrix of i.i.d. unit-variance entries, beta = min / max (the Marchenko-Pastur law of
    s^2 / max(n, m)). Integrated in theta, lambda = a + (b - a) sin^2(theta), which removes the
    square-root singularities at the edges."""
    import numpy as np

    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    theta = np.linspace(0.0, math.pi / 2, points)
    lam = a + (b - a) * np.sin(theta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        # f(lambda) dlambda = sqrt((b - l)(l - a)) / (2 pi beta l) dl = (b - a)^2 sin^2 cos^2 / (pi beta l) dtheta
        g = (b - a) ** 2 * np.sin(theta) ** 2 * np.cos(theta) ** 2 / (math.pi * beta * lam)
    if a == 0.0:  # beta = 1: the limit at theta = 0 is b cos^2(0) / pi
        g[0] = b / math.pi
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(theta))])
    return np.sqrt(lam), cdf / cdf[-1]


def mp_singular_value_quantile(q: float, beta: float) -> float:
    """The q-quantile of s / sqrt(max(n, m)) for a pure-noise n x m matrix of unit-variance entries
    (beta = min / max), in the large-matrix limit. Its support is [1 - sqrt(beta), 1 + sqrt(beta)]."""
    import numpy as np

    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    x, cdf = _mp_sqrt_cdf(round(float(beta), 12))
    return float(np.interp(q, cdf, x))


def mp_singular_value_density(x, beta: float):
    """The density of s / sqrt(max(n, m)) at x (array-like) for a pure-noise matrix of unit-variance
    entries: 2x f(x^2), f the Marchenko-Pastur density of ratio beta (the quarter circle
    sqrt(4 - x^2) / pi for beta = 1). Zero outside [1 - sqrt(beta), 1 + sqrt(beta)]."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    lam = x ** 2
    inside = (lam > a) & (lam < b)
    out = np.zeros_like(x)
    out[inside] = np.sqrt((b - lam[inside]) * (lam[inside] - a)) / (math.pi * beta * x[inside])
    return out


def mp_iqr(beta: float) -> float:
    """Interquartile range of s / sqrt(max(n, m)) of pure noise (0.8741 for a square matrix, the quarter-circle law's): the
    constant the calibrated rule divides IQR(S) by."""
    return mp_singular_value_quantile(0.75, beta) - mp_singular_value_quantile(0.25, beta)


def mp_threshold(s: torch.Tensor, n: int, m: int, rule: str = "reference") -> tuple[float, float]:
    """(edge, noise scale) for the singular values s (k,) of an n x m matrix.

    "reference": scale = IQR(s) / 1.349, rmt_laser.py's estimate; "calibrated": scale =
    IQR(s) / mp_iqr(beta), which for pure noise of entry s.d. sigma estimates sigma sqrt(max(n, m)),
    so the edge sigma (sqrt(n) + sqrt(m)) is the top of its spectrum. Either way edge = scale (1 + sqrt(beta)).
    """
    if rule not in THRESHOLDS:
        raise ValueError(f"rule must be one of {', '.join(THRESHOLDS)}, got {rule!r}")
    constant = GAUSSIAN_IQR if rule == "reference" else mp_iqr(aspect_ratio(n, m))
    scale = float(iqr_noise_scale(s, constant))
    return float(mp_edge(scale, n, m)), scale


@dataclass(frozen=True)
class Reduction:
    """What `reduce_rank` did to one matrix."""

    rank: int
    """Singular values kept (those above the edge)."""

    full_rank: int
    """min(n, m): how many there were."""

    edge: float
    """The threshold the singular values were compared with."""

    noise_scale: float
    """The estimated noise scale the edge was computed from."""

    energy_kept: float
    """Share of the squared Frobenius norm kept: sum of the kept S^2 over the sum of all S^2."""


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """(min(n, m),) singular values of w (n, m) in float64, descending."""
    return torch.linalg.svdvals(w.detach().to(torch.float64))


def reduce_rank(w: torch.Tensor, rule: str = "reference") -> tuple[torch.Tensor, Reduction]:
    """(w' (n, m) in w's dtype and device, what was kept): w rebuilt from its singular values above
    the Marchenko-Pastur edge (`mp_threshold`). The SVD runs in float64."""
    n, m = w.shape
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)  # (n, k), (k,), (k, m)
    edge, scale = mp_threshold(s, n, m, rule)
    k = int((s > edge).sum())
    reduced = (u[:, :k] * s[:k]) @ vh[:k]                                             # (n, m)
    total = float((s ** 2).sum())
    energy = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return reduced.to(w.dtype), Reduction(rank=k, full_rank=len(s), edge=edge, noise_scale=scale, energy_kept=energy)


# --------------------------------------------------------------------------------------------
# perplexity


@dataclass
class PerplexityResult:
    """A perplexity with the per-document sums it came from (for standard errors and paired differences)."""

    nll: list[float]
    """Summed negative log-likelihood (nats) of each document's scored tokens."""

    tokens: list[int]
    """Scored tokens of each document."""

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL: all documents' NLL over all their scored tokens."""
        return sum(self.nll) / sum(self.tokens)

    @property
    def ppl(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll)

    @property
    def mean_nll_se(self) -> float:
        """Standard error of mean_nll over documents (the ratio estimator's, by the delta method)."""
        return _ratio_se(self.nll, self.tokens)

    @property
    def ppl_se(self) -> float:
        """Standard error of ppl over documents: ppl x mean_nll_se (delta method)."""
        return self.ppl * self.mean_nll_se

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)

    def summary(self) -> dict[str, float]:
        return {"ppl": self.ppl, "ppl_se": self.ppl_se, "mean_nll": self.mean_nll, "mean_nll_se": self.mean_nll_se,
                "documents": len(self.tokens), "tokens": self.num_tokens}


def _ratio_se(y: Sequence[float], n: Sequence[int]) -> float:
    """Standard error of sum(y) / sum(n) over k clusters (y_i, n_i): sqrt(sum((y_i - R n_i)^2) /
    (k (k - 1))) / mean(n). NaN for fewer than 2 clusters."""
    k = len(n)
    if k < 2:
        return float("nan")
    r = sum(y) / sum(n)
    resid = sum((yi - r * ni) ** 2 for yi, ni in zip(y, n))
    return math.sqrt(resid / (k * (k - 1))) / (sum(n) / k)


def paired_change(before: PerplexityResult, after: PerplexityResult) -> dict[str, float]:
    """How the perplexity of the same documents moved: relative change ppl_after / ppl_before - 1, the
    change in mean NLL and its standard error over documents (paired: each document's NLL
    difference), and the relative change's standard error (delta method)."""
    if before.tokens != after.tokens:
        raise ValueError("perplexities of different texts cannot be paired")
    diff = [a - b for a, b in zip(after.nll, before.nll)]
    d = sum(diff) / sum(before.tokens)
    se = _ratio_se(diff, before.tokens)
    ratio = math.exp(d)
    return {"ppl_before": before.ppl, "ppl_after": after.ppl, "relative_change": ratio - 1.0,
            "relative_change_se": ratio * se, "nll_change": d, "nll_change_se": se}


@dataclass
class _Window:
    ids: list[int]          # the window's tokens
    score_from: int         # targets at positions >= score_from of the window are scored (>= 1)
    doc: int                # the document it belongs to


def make_windows(doc: Sequence[int], window: int, stride: int = 0) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of the windows over a document of len(doc) tokens.

    stride 0: fixed windows [0, w), [w, 2w), ...; each scores its tokens but the first, which has no
    context in the window (the reference's). stride s < w: windows start every s tokens and each
    scores the tokens not scored before, with the rest of the window as their context; every token
    but the document's first is scored exactly once.
    """
    length = len(doc)
    if length < 2:
        return []
    step = stride or window
    out, scored_to = [], 1   # the first token is never a target
    for begin in range(0, length, step):
        end = min(begin + window, length)
        first = max(scored_to, begin + 1)
        if end > first:
            out.append((begin, end, first - begin))
        scored_to = end
        if end == length:
            break
    return out


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config (max_position_embeddings, n_positions), or None."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class PerplexityEvaluator:
    """Token-weighted perplexity of a causal LM over a fixed list of documents (token id lists).

    Each document is cut into windows (`make_windows`); windows are batched longest first, padded
    on the right; the NLL of every scored token is summed per document. `evaluator()` returns a
    `PerplexityResult` for the model's current weights.

    frozen_below: a layer index L. The caller promises that decoder blocks below L do not change
        between calls: their output (what block L receives) is computed on the first call and
        reused, so later calls run only blocks L.. and the head. Exact up to float rounding; needs a
        body with `embed_tokens` and `layers` (Llama, Mistral, Qwen2; see models.top_layers_from).
    """

    def __init__(self, model, documents: Sequence[Sequence[int]], *, window: int = 384, stride: int = 0,
                 batch_size: int = 8, frozen_below: int | None = None, progress: bool = False,
                 desc: str = "perplexity"):
        limit = context_length(model)
        if limit is not None and window > limit:
            raise ValueError(f"window = {window} tokens is longer than the model's context ({limit} tokens)")
        if not 0 <= stride < window:
            raise ValueError(f"stride = {stride}: must be 0 (fixed windows) or 1 to window - 1 = {window - 1}")
        self.model, self.window, self.stride, self.batch_size = model, window, stride, batch_size
        self.progress, self.desc = progress, desc
        self.num_documents = len(documents)
        windows = [_Window(list(doc[b:e]), first, i) for i, doc in enumerate(documents)
                   for b, e, first in make_windows(doc, window, stride)]
        if not windows:
            raise ValueError("no document has 2 tokens or more: nothing to score")
        windows.sort(key=lambda w: -len(w.ids))
        self.batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        self.scored_tokens = sum(len(w.ids) - w.score_from for w in windows)
        self.frozen_below = frozen_below
        if frozen_below is not None:
            body = getattr(model, "model", None)
            if body is None or not hasattr(body, "embed_tokens") or not hasattr(body, "layers"):
                raise TypeError(f"frozen_below needs a causal LM whose body has embed_tokens and layers "
                                f"(Llama, Mistral, Qwen2); {type(model).__name__} has not: pass frozen_below=None")
            if not 0 <= frozen_below < len(decoder_layers(model)):
                raise ValueError(f"frozen_below = {frozen_below}: the model has {len(decoder_layers(model))} layers")
        self._trunk: list[torch.Tensor] | None = None
        self.calls = 0

    def _inputs(self, batch: list[_Window], device):
        width = max(len(w.ids) for w in batch)
        pad = 0
        ids = torch.tensor([w.ids + [pad] * (width - len(w.ids)) for w in batch], device=device)          # (B, T)
        mask = torch.tensor([[1] * len(w.ids) + [0] * (width - len(w.ids)) for w in batch], device=device)  # (B, T)
        return ids, mask

    @torch.no_grad()
    def __call__(self, progress: bool | None = None) -> PerplexityResult:
        from tqdm.auto import tqdm

        model = self.model
        device = next(model.parameters()).device
        nll = [0.0] * self.num_documents
        tokens = [0] * self.num_documents
        cache_now = self.frozen_below is not None and self._trunk is None
        trunk = [] if cache_now else self._trunk
        show = self.progress if progress is None else progress
        for j, batch in enumerate(tqdm(self.batches, desc=self.desc, disable=not show, leave=False)):
            ids, mask = self._inputs(batch, device)
            if self.frozen_below is None:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits      # (B, T, V)
            else:
                if cache_now:
                    trunk.append(trunk_output(model.model, self.frozen_below, input_ids=ids, attention_mask=mask))
                with top_layers_from(model.model, self.frozen_below, trunk[j]):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
            for row, w in enumerate(batch):
                # logits at position t predict the token at t + 1; targets are positions score_from .. len - 1
                pred = logits[row, w.score_from - 1:len(w.ids) - 1].float()                   # (n, V)
                target = ids[row, w.score_from:len(w.ids)]                                    # (n,)
                loss = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
                nll[w.doc] += float(loss)
                tokens[w.doc] += len(target)
            del logits
        if cache_now:
            self._trunk = trunk
        self.calls += 1
        keep = [i for i, n in enumerate(tokens) if n > 0]
        return PerplexityResult(nll=[nll[i] for i in keep], tokens=[tokens[i] for i in keep])


# --------------------------------------------------------------------------------------------
# the text: bundled Nectar answers in the model's chat format, or the reference's wikitext-2


@dataclass
class Corpus:
    """Token-id documents to search on and to report on, and where they came from."""

    name: str
    search: list[list[int]]
    heldout: list[list[int]]
    description: str
    heldout_prompts: list[list[dict]] = field(default_factory=list)
    """Nectar only: the held-out split's prompts (chat messages, all of them, not only those within
    the token budget), for answering with the model."""

    def table(self) -> "Any":
        import pandas as pd
        return pd.DataFrame([{"split": name, "documents": len(docs), "tokens": sum(map(len, docs))}
                             for name, docs in (("search", self.search), ("held-out", self.heldout))]).set_index("split")


def _take_tokens(docs: list[list[int]], budget: int) -> list[list[int]]:
    """The first documents up to `budget` tokens in all, the last one cut to fit; 0 means all."""
    if budget <= 0:
        return docs
    out, total = [], 0
    for doc in docs:
        if total >= budget:
            break
        out.append(doc[: budget - total])
        total += len(out[-1])
    return out


def render_document(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a whole conversation in the tokenizer's chat template (BOS as the template writes it)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def nectar_corpus(tokenizer, *, search_tokens: int = 0, heldout_tokens: int = 0, heldout_fraction: float = 0.5,
                  document_tokens: int = 0, seed: int = 0, source: str = "bundled") -> Corpus:
    """Nectar conversations (each prompt with its best-ranked answer) in the model's chat format, split
    by prompt (`data.split_by_prompt`: no prompt is on both sides) into a search and a held-out split,
    each cut to its token budget (0: all). document_tokens: keep only each conversation's first this
    many tokens (0: whole), so that a small budget still spans many documents."""
    from starling_lib.data import load_nectar, prompt_to_messages, ranked, split_by_prompt

    split = split_by_prompt(load_nectar(source), test_fraction=heldout_fraction, seed=seed)

    def docs(rows):
        messages = [prompt_to_messages(r["prompt"]) for r in rows]
        full = [m + [{"role": "assistant", "content": ranked(r)[0]["answer"]}] for m, r in zip(messages, rows)]
        rendered = [render_document(tokenizer, f) for f in full]
        return [d[:document_tokens] if document_tokens > 0 else d for d in rendered], messages

    search, _ = docs(split["train"])
    heldout, prompts = docs(split["test"])
    search, heldout = _take_tokens(search, search_tokens), _take_tokens(heldout, heldout_tokens)
    return Corpus("nectar", search, heldout,
                  f"Nectar ({source}): each prompt with its best-ranked answer in the model's chat template; "
                  f"{heldout_fraction:.0%} of prompts held out (split by prompt, seed {seed})", prompts)


WIKITEXT_HUB_ID = "Salesforce/wikitext"   # the reference's load_dataset('wikitext', ...), moved on the hub


def wikitext2_corpus(tokenizer, *, window: int = 384, search_tokens: int = 0, heldout_tokens: int = 0) -> Corpus:
    """The reference's wikitext-2 (wikitext-2-raw-v1) from the hub: each split's texts joined by
    "\\n\\n" and tokenized as one stream (the tokenizer adds BOS, as the reference's), cut into
    documents of `window` tokens, the remainder dropped (its nsamples = numel // seqlen). The
    validation split is searched on, the test split (the reference's) reported on. Needs network
    access the first time (then the datasets cache)."""
    import datasets

    def stream(split: str, budget: int) -> list[list[int]]:
        texts = datasets.load_dataset(WIKITEXT_HUB_ID, "wikitext-2-raw-v1", split=split)["text"]
        ids = tokenizer("\n\n".join(texts))["input_ids"]
        docs = [ids[i * window:(i + 1) * window] for i in range(len(ids) // window)]
        return _take_tokens(docs, budget)

    return Corpus("wikitext-2", stream("validation", search_tokens), stream("test", heldout_tokens),
                  f"wikitext-2-raw-v1 ({WIKITEXT_HUB_ID}): validation to search, test to report, "
                  f"in {window}-token pieces")


def load_corpus(name: str, tokenizer, *, window: int, search_tokens: int = 0, heldout_tokens: int = 0,
                heldout_fraction: float = 0.5, document_tokens: int = 0, seed: int = 0) -> Corpus:
    """"nectar" (bundled, offline; `nectar_corpus`) or "wikitext-2" (the hub; `wikitext2_corpus`,
    which ignores heldout_fraction, document_tokens and seed: its splits are fixed)."""
    if name == "nectar":
        return nectar_corpus(tokenizer, search_tokens=search_tokens, heldout_tokens=heldout_tokens,
                             heldout_fraction=heldout_fraction, document_tokens=document_tokens, seed=seed)
    if name in ("wikitext-2", "wikitext2"):
        return wikitext2_corpus(tokenizer, window=window, search_tokens=search_tokens, heldout_tokens=heldout_tokens)
    raise ValueError(f"corpus = {name!r}: must be 'nectar' (bundled) or 'wikitext-2' (the hub)")


# --------------------------------------------------------------------------------------------
# the search


def searched_layers(model, cfg: LaserConfig) -> list[int]:
    """Indices of the decoder layers searched, top down: the top `cfg.top_layers` of the model."""
    n = len(decoder_layers(model))
    if cfg.top_layers > n:
        raise ValueError(f"LaserConfig.top_layers = {cfg.top_layers}: the model has only {n} decoder layers")
    return list(range(n - 1, n - 1 - cfg.top_layers, -1))


def layer_matrix(model, layer: int, matrix: str) -> torch.nn.Parameter:
    """The weight (n, m) = (out, in) of `matrix` (an attribute path such as "mlp.down_proj") in decoder block `layer`."""
    module = decoder_layers(model)[layer]
    for part in matrix.split("."):
        if not hasattr(module, part):
            raise ValueError(f"decoder layer {layer} ({type(decoder_layers(model)[layer]).__name__}) has no {matrix!r}")
        module = getattr(module, part)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
        raise ValueError(f"layer {layer} {matrix!r} is not a linear layer with a 2-d weight")
    return weight


@dataclass
class Attempt:
    """One entry of the search's log."""

    layer: int
    matrix: str
    shape: tuple[int, int]
    rank: int
    """Singular values kept."""
    full_rank: int
    energy_kept: float
    edge: float
    ppl_before: float
    """The current perplexity on the search text (after every change accepted so far)."""
    ppl_after: float | None
    """With this matrix reduced; None when not tried (the rule kept every singular value)."""
    accepted: bool
    seconds: float
    note: str = ""


@dataclass
class LaserResult:
    """The outcome of `laser_search`: the model was modified in place."""

    config: LaserConfig
    layers: list[int]
    attempts: list[Attempt]
    initial: PerplexityResult
    """Search-text perplexity before any change."""
    final: PerplexityResult
    """Search-text perplexity after the accepted changes."""
    wall_s: float
    stopped_by_budget: bool
    originals: dict = field(default_factory=dict, repr=False)
    """(layer, matrix) -> the weight before its accepted change (on the CPU), for `original_weights`."""

    @property
    def accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.accepted]


def laser_search(model, evaluate: Callable[[], PerplexityResult], cfg: LaserConfig = LaserConfig()) -> LaserResult:
    """Greedy LaserRMT search (rmt_laser.py's `search_optimal_layer_modification`), in place.

    For each searched layer from the top down and each matrix type in order, while fewer than
    `cfg.max_modifications` changes are accepted (0: no limit): reduce the matrix's rank
    (`reduce_rank`), measure `evaluate()` (the search text's perplexity), keep the change if the
    perplexity fell below the current one (by more than `cfg.min_improvement` of it), else copy
    the saved weight back, bit for bit. Every attempt is logged.

    evaluate: a `PerplexityEvaluator` of the model on the search split (or any callable giving a
        PerplexityResult); with `frozen_below` it must be at most the lowest searched layer.
    """
    from tqdm.auto import tqdm

    layers = searched_layers(model, cfg)
    frozen = getattr(evaluate, "frozen_below", None)
    if frozen is not None and frozen > min(layers):
        raise ValueError(f"the evaluator reuses the output of the blocks below layer {frozen}, but the search "
                         f"changes layer {min(layers)}: build it with frozen_below <= {min(layers)}")
    start = time.perf_counter()
    initial = current = evaluate()
    attempts: list[Attempt] = []
    originals: dict = {}
    accepted = 0
    stopped = False
    plan = [(layer, matrix) for layer in layers for matrix in cfg.matrices]
    bar = tqdm(plan, desc="LaserRMT search", disable=not cfg.progress)
    for layer, matrix in bar:
        if cfg.max_modifications and accepted >= cfg.max_modifications:
            stopped = True
            break
        t0 = time.perf_counter()
        weight = layer_matrix(model, layer, matrix)
        original = weight.detach().clone()
        reduced, info = reduce_rank(original, cfg.threshold)
        common = dict(layer=layer, matrix=matrix, shape=tuple(weight.shape), rank=info.rank, full_rank=info.full_rank,
                      energy_kept=info.energy_kept, edge=info.edge, ppl_before=current.ppl)
        if info.rank == info.full_rank:
            attempts.append(Attempt(**common, ppl_after=None, accepted=False, seconds=time.perf_counter() - t0,
                                    note="every singular value is above the edge: nothing to cut"))
            continue
        with torch.no_grad():
            weight.copy_(reduced)
        trial = evaluate()
        ok = trial.ppl < current.ppl * (1.0 - cfg.min_improvement)
        if ok:
            current = trial
            accepted += 1
            originals[(layer, matrix)] = original.cpu()
        else:
            with torch.no_grad():
                weight.copy_(original)   # the same dtype: bit for bit what was there
        del original
        attempts.append(Attempt(**common, ppl_after=trial.ppl, accepted=ok, seconds=time.perf_counter() - t0))
        bar.set_postfix(ppl=f"{current.ppl:.4f}", accepted=accepted)
    bar.close()
    return LaserResult(config=cfg, layers=layers, attempts=attempts, initial=initial, final=current,
                       wall_s=time.perf_counter() - start, stopped_by_budget=stopped, originals=originals)


@contextlib.contextmanager
def original_weights(model, result: LaserResult):
    """Within the block the model has its weights from before the search again, bit for bit; the
    modified ones come back afterwards (also bit for bit). Saves loading a second copy of the model."""
    swapped = []
    try:
        with torch.no_grad():
            for (layer, matrix), original in result.originals.items():
                weight = layer_matrix(model, layer, matrix)
                swapped.append((weight, weight.detach().clone()))
                weight.copy_(original.to(weight.device))
        yield model
    finally:
        with torch.no_grad():
            for weight, modified in swapped:
                weight.copy_(modified)


def attempts_frame(result: LaserResult):
    """The search's log as a table: one row per attempt, in order."""
    import pandas as pd

    rows = [{"layer": a.layer, "matrix": a.matrix, "shape": f"{a.shape[0]} x {a.shape[1]}",
             "rank kept": a.rank, "of": a.full_rank, "energy kept": a.energy_kept,
             "ppl before": a.ppl_before, "ppl after": a.ppl_after, "accepted": a.accepted,
             "seconds": a.seconds, "note": a.note} for a in result.attempts]
    return pd.DataFrame(rows)


def spectrum_table(model, layers: Sequence[int], matrices: Sequence[str]):
    """For each candidate matrix: its shape, the ranks each rule keeps and its singular values' IQR (no change made)."""
    import pandas as pd

    rows = []
    for layer in layers:
        for matrix in matrices:
            w = layer_matrix(model, layer, matrix)
            n, m = w.shape
            s = singular_values(w)
            row = {"layer": layer, "matrix": matrix, "shape": f"{n} x {m}", "full rank": len(s)}
            for rule in THRESHOLDS:
                edge, _ = mp_threshold(s, n, m, rule)
                row[f"rank kept ({rule})"] = int((s > edge).sum())
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# the modified model on disk, and what a reward model makes of it


def laser_model_dir(run_dir: str | os.PathLike | None) -> Path:
    """`run_dir/06_laser_rank_reduction/model`: the modified model, a transformers folder."""
    from starling_lib.runs import stage_dir
    return stage_dir(run_dir, LASER_STAGE) / "model"


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_laser_model(model, tokenizer, path: str | os.PathLike, result: LaserResult, source: str = "") -> Path:
    """Save the modified model as a transformers checkpoint (safetensors) with its tokenizer, loadable
    by path like any other (`models.load_model_and_tokenizer(path)`, notebook 05's `models`), and
    `laser.json`: the source model, the settings and the log."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    info = {"source": source, "method": "LaserRMT (rank reduction at the Marchenko-Pastur edge)",
            "config": _jsonable(result.config), "layers": result.layers,
            "search_ppl_initial": result.initial.ppl, "search_ppl_final": result.final.ppl,
            "accepted": [(a.layer, a.matrix, a.rank, a.full_rank) for a in result.accepted],
            "attempts": [_jsonable(a) for a in result.attempts]}
    (path / "laser.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def check_saved(model, path: str | os.PathLike, result: LaserResult):
    """For each accepted change: is the saved checkpoint's tensor bit-identical to the modified
    weight in memory? Reads only those tensors (safetensors, single file or sharded)."""
    import pandas as pd
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for a in result.accepted:
        weight = layer_matrix(model, a.layer, a.matrix)
        name = names[id(weight)]
        file = path / (files[name] if files else "model.safetensors")
        with safe_open(str(file), framework="pt") as f:
            saved = f.get_tensor(name)
        rows.append({"tensor": name, "rank": f"{a.rank} of {a.full_rank}",
                     "saved = in memory (bit for bit)": torch.equal(saved, weight.detach().cpu())})
    return pd.DataFrame(rows, columns=["tensor", "rank", "saved = in memory (bit for bit)"])


def find_reward_model(run_dir: str | os.PathLike | None, reward_model: str = "") -> Path | None:
    """The reward-model folder to score with: `reward_model` if given, else notebook 03's in this run
    folder (`03_kwise_reward_training/reward_model`); None when there is none (nothing is created)."""
    from starling_lib.rm_io import CONFIG_FILE
    from starling_lib.runs import INTERACTIVE_RUN_DIR, RM_STAGE

    path = Path(reward_model) if reward_model else Path(run_dir or INTERACTIVE_RUN_DIR) / RM_STAGE / "reward_model"
    return path if (path / CONFIG_FILE).is_file() else None


def reward_effect(reward_model, model, tokenizer, prompts: Sequence[Sequence[dict]], result: LaserResult, *,
                  max_new_tokens: int = 32, batch_size: int = 8) -> tuple[dict[str, float], "Any"]:
    """What a reward model makes of the change: the model before the search (`original_weights`)
    and after it answer the same prompts greedily, the reward model scores both answers. Returns
    (summary, per-prompt table): mean rewards, the paired difference modified - original with its
    standard error over prompts, and the share of identical answers."""
    import pandas as pd

    from starling_lib.chat import DecodingConfig, chat_batch

    decoding = DecodingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = {}
    with original_weights(model, result):
        answers["original"] = chat_batch(model, tokenizer, prompts, config=decoding, progress=True)
    answers["modified"] = chat_batch(model, tokenizer, prompts, config=decoding, progress=True)
    scores = {name: reward_model.score(list(prompts), a, batch_size=batch_size).float().tolist()
              for name, a in answers.items()}
    table = pd.DataFrame({"prompt": [p[-1]["content"][:80] for p in prompts],
                          "original answer": answers["original"], "modified answer": answers["modified"],
                          "original reward": scores["original"], "modified reward": scores["modified"]})
    d = table["modified reward"] - table["original reward"]
    n = len(d)
    summary = {"prompts": n, "reward_original": float(table["original reward"].mean()),
               "reward_modified": float(table["modified reward"].mean()), "diff": float(d.mean()),
               "diff_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
               "identical_answers": float((table["original answer"] == table["modified answer"]).mean())}
    return summary, table


def reward_prompts(corpus: Corpus, tokenizer, n: int, max_prompt_tokens: int = 256) -> list[list[dict]]:
    """The first `n` held-out prompts (Nectar's, whatever text the perplexity used) whose rendered
    prompt fits `max_prompt_tokens`."""
    from starling_lib.chat import render
    from starling_lib.data import load_nectar, prompt_to_messages, split_by_prompt

    prompts = corpus.heldout_prompts
    if not prompts:
        prompts = [prompt_to_messages(p) for p in split_by_prompt(load_nectar("bundled"), 0.5)["test"]["prompt"]]
    fits = [p for p in prompts if len(tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"]) <= max_prompt_tokens]
    return fits[:n]


# --------------------------------------------------------------------------------------------
# metrics


def median_change_by_matrix(result: LaserResult) -> dict[str, float]:
    """Median relative perplexity change of the tried attempts of each matrix type (against the
    model they were tried on), in the search's order of types."""
    import statistics

    out = {}
    for matrix in result.config.matrices:
        changes = [a.ppl_after / a.ppl_before - 1 for a in result.attempts if a.matrix == matrix and a.ppl_after is not None]
        if changes:
            out[matrix] = statistics.median(changes)
    return out


def laser_metrics(result: LaserResult, *, heldout_initial: PerplexityResult, heldout_final: PerplexityResult,
                  corpus: Corpus, model_name: str, model_dir: str | os.PathLike | None = None,
                  reward: Mapping[str, float] | None = None, spectrum=None,
                  spectrum_example: Mapping[str, Any] | None = None, notebook_s: float | None = None) -> dict[str, Any]:
    """The `laser/...` metrics of notebook 06.

    result: `laser_search`'s; heldout_initial / heldout_final: the held-out split's perplexity before
    and after (the same documents); reward: `reward_effect`'s summary, when a reward model was found;
    spectrum: `spectrum_table`, for the ranks each rule would keep; spectrum_example: the one matrix
    drawn against a pure-noise one (its shape, beta and the ranks each rule keeps of both);
    notebook_s: the notebook's wall time.
    """
    search = paired_change(result.initial, result.final)
    held = paired_change(heldout_initial, heldout_final)
    out: dict[str, Any] = {
        "laser/model": model_name, "laser/corpus": corpus.name, "laser/threshold": result.config.threshold,
        "laser/layers": result.layers, "laser/matrices": list(result.config.matrices),
        "laser/attempts": sum(a.ppl_after is not None for a in result.attempts),
        "laser/candidates": len(result.layers) * len(result.config.matrices),
        "laser/accepted": len(result.accepted), "laser/stopped_by_budget": result.stopped_by_budget,
        "laser/search_s": result.wall_s,
        "laser/published/ppl_initial": PUBLISHED["ppl_initial"], "laser/published/ppl_final": PUBLISHED["ppl_final"],
        "laser/published/modifications": PUBLISHED["modifications"],
        "laser/attempts_table": [{"layer": a.layer, "matrix": a.matrix, "rank": a.rank, "full_rank": a.full_rank,
                                  "ppl_before": a.ppl_before, "ppl_after": a.ppl_after, "accepted": a.accepted}
                                 for a in result.attempts],
        "laser/model_dir": None if model_dir is None else str(model_dir),
    }
    for split, pr_before, pr_after, change in (("search", result.initial, result.final, search),
                                               ("heldout", heldout_initial, heldout_final, held)):
        out[f"laser/{split}/ppl_initial"] = pr_before.ppl
        out[f"laser/{split}/ppl_initial_se"] = pr_before.ppl_se
        out[f"laser/{split}/ppl_final"] = pr_after.ppl
        out[f"laser/{split}/ppl_final_se"] = pr_after.ppl_se
        out[f"laser/{split}/relative_change"] = change["relative_change"]
        out[f"laser/{split}/relative_change_se"] = change["relative_change_se"]
        out[f"laser/{split}/documents"] = len(pr_before.tokens)
        out[f"laser/{split}/tokens"] = pr_before.num_tokens
    # How much of the search split's improvement is selection: the part the held-out split does not show.
    out["laser/selection_gap"] = held["relative_change"] - search["relative_change"]
    out["laser/params_changed"] = sum(a.shape[0] * a.shape[1] for a in result.accepted)
    tried = [a for a in result.attempts if a.ppl_after is not None]
    out["laser/s_per_attempt"] = result.wall_s / max(1, len(result.attempts))
    out["laser/published/relative_change"] = PUBLISHED["ppl_final"] / PUBLISHED["ppl_initial"] - 1
    for matrix, change in median_change_by_matrix(result).items():
        out[f"laser/median_change/{matrix}"] = change
    out["laser/tried"] = len(tried)
    if spectrum_example is not None:
        for key, value in spectrum_example.items():
            out[f"laser/spectrum_example/{key}"] = value
    if notebook_s is not None:
        out["laser/notebook_s"] = notebook_s
    if spectrum is not None:
        for rule in THRESHOLDS:
            col = f"rank kept ({rule})"
            out[f"laser/spectrum/{rule}_rank_share"] = float(spectrum[col].sum() / spectrum["full rank"].sum())
    if reward is not None:
        for key, value in reward.items():
            out[f"laser/reward/{key}"] = value
    return out

