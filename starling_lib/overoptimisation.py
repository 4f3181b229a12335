"""Reward over-optimisation (Goodhart's law): tuning hard against a proxy reward model can lower
the preference it stands for (notebook 07).

The Starling blog warns that optimising too hard against a reward model can hurt the preference
it stands for, citing Gao, Schulman and Hilton (2022), *Scaling Laws for Reward Model
Overoptimization*, arXiv:2210.10760. Their set-up, scaled down here:

- a **gold** reward model stands in for the true preference: here notebook 03's reward model of
  the same run (`rm_io.reward_model_dir`), trained on all of its training prompts;
- a **proxy** reward model is trained on less of the same data: here `rm_train` with notebook 03's
  recorded settings (body, max length, trained layers, lr, seed: its `reward_model.json`) but on
  `proxy_fraction` of its training prompts, for as many epochs (`proxy_config`);
- the initial policy is tuned against the proxy with APA and PPO (`starling_lib.policy.train_online`,
  the scorer being a `DualScorer` that hands the proxy's scores to the trainer and records the gold
  model's scores of the very same responses), and both rewards are plotted against
  d = sqrt(KL(pi || pi_init)), the distance from the initial policy. Over-optimisation shows as the
  proxy reward rising while the gold reward rises, peaks and falls.

Each reward is reported as a gain over the initial policy in units of the initial policy's score
spread: (mean score at a step - mean score of the initial policy's responses) / their sd, where
"the initial policy's responses" are every run's first rollout batch (the policy is still the
initial one there), so that two reward models on different scales are comparable.
`curve_summary` reads a curve's peak (the step whose mean gain over seeds, smoothed over
`smooth_steps` steps, is highest), the KL there, and the fall from the peak to the last step with
its standard error over seeds (paired per seed); `fit_gao_forms` fits the paper's functional forms.

Departures from Gao et al. (2022):
- their gold model is a 6B reward model, the proxies 3M-3B models trained on up to about 90k
  comparisons that it labelled, the policy 1.2B, up to KL of about 100 nats over tens of thousands of
  steps; here (the demo) gold and proxy are SmolLM2-135M with the top 2 layers trained on 48 and
  12 Nectar prompts, the policy SmolLM2-135M-Instruct with its top 2 layers trained, for a few
  dozen steps. The gold model is itself a weak judge of quality: the experiment shows the gap
  between two reward models, one of them trained on more of the same data, not between a model
  and human preference;
- their gold labels are the gold model's own (the proxies are trained on gold-labelled
  comparisons); ours are both trained on Nectar's GPT-4 rankings, the proxy on a subset;
- their proxies are separate models; ours shares the gold model's body, frozen trunk and seed
  (so its split and its head's initialisation), only the top blocks and the head being trained
  apart. The two agree closely at the start: on the initial policy's answers in the demo their
  scores correlate 0.74 (proxy on 12 of the 48 prompts for 12 steps; 0.89 for 48 steps), so the
  proxy is a good one near the initial policy and it takes a long way to find where they part;
- they also use best-of-n sampling; we only use RL (APA and PPO; PPO with no KL penalty by
  default, as most of Gao et al.'s RL runs, who study the penalty apart);
- d is sqrt of the k3 estimate of KL summed over a response's tokens and averaged over the step's
  rollout batch (the trainer's `policy/<method>/kl`), the rewards are that batch's means; they
  evaluate on held-out prompts. On the demo's budget the rollout batches cycle through a small
  fixed pool of prompts (`prompt_pool`), so a step's mean compares with the initial policy's on
  the same prompts (about 60% of SmolLM2's score spread is between prompts, notebook 04);
- they fit gold(d) = d (alpha - beta log d) to RL and d (alpha - beta d) to best-of-n; we fit
  both (least squares on every seed's points, linear in alpha and beta) and print them, but read
  the peak from the data, not the fit: a few dozen noisy points do not pin a functional form.

Measured on the demo (papermill_runs/demo_cpu.yaml: SmolLM2, lr 1e-3, no KL penalty, 2 seeds x
8 steps of 8 responses to the same 2 prompts; gains in initial-policy sd, +- s.e. over seeds):
the KL to the initial policy of a run is 5-21 nats after the first update and 13-37 at the end;
the gold gain of APA is highest at step 2 (+0.37 +- 0.40, KL 13) and ends at +0.11, a fall of
+0.26 +- 0.34 whose 95% interval (2 seeds: t = 12.7) holds 0; PPO's is still rising at the end
(+0.71 +- 0.18, KL 19) with its proxy's (+0.77 +- 0.25); proxy minus gold at the end +0.05 (APA)
and +0.17 (PPO). So this budget shows the gold reward following the proxy closely, not a
significant peak and fall. With 1 seed x 16 steps (lr 1e-3, the proxy trained 48 steps) the gold
gain was +0.81 (APA, KL 46) and +0.64 (PPO, KL 32) at the end, still rising. A weaker proxy
(5 of the 48 prompts, 5 steps; its scores of the initial policy's answers correlate 0.57 with the
gold model's), 1 seed x 12 steps: the gold and proxy gains rise and fall together (PPO's gold
highest at +1.30 at step 7, KL 16, ending at +0.52 with its proxy's +0.64), no cleaner picture. PPO without a penalty collapses one seed's answers to one
near-identical text per prompt by the last step. Held-out pair accuracy on 8 prompts: gold 0.73,
proxy 0.65 (+0.08, 95% [0.01, 0.16]).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

OVEROPT_STAGE = "07_reward_overoptimisation"
RM_KEYS = ("gold", "proxy")


@dataclass
class OveroptConfig:
    """One over-optimisation experiment: the proxy reward model, and the policy runs against it."""

    policy: str = "tiny"
    """Initial policy tuned against the proxy: "tiny" (random weights, a code check), "sft-tiny",
    "smollm2-135m" (the demo's), a hub id or a folder (policy.prompts.resolve_policy)."""

    methods: tuple[str, ...] = ("apa", "ppo")
    """Online methods run against the proxy, each with every seed (policy.ONLINE_METHODS)."""

    seeds: int = 2
    """Seeds per method (seed, seed + 1, ...): the spread of the curves across them gives the intervals."""

    proxy_fraction: float = 0.25
    """Share of the gold reward model's training prompts the proxy is trained on (a seeded subset,
    rm_train's `train_prompts`); everything else is the gold model's recorded settings."""

    proxy_steps: int = 0
    """Optimizer steps of the proxy; 0 scales the gold model's by the share of prompts it sees
    (at least 1), so the proxy passes over its data as many times as the gold model did."""

    proxy_settings: str = ""
    """Other rm_train settings in which the proxy departs from the gold model, comma-separated
    name:value (or name=value) pairs, e.g. "unfrozen_layers:8,gradient_checkpointing:true" when
    the gold model was fully fine-tuned on many GPUs and the proxy must fit one; "" copies them all."""

    steps: int = 12
    """Policy steps per run; each samples `rollouts_per_step` responses and scores them with both models."""

    rollouts_per_step: int = 8
    """Responses sampled per step."""

    responses_per_prompt: int = 4
    """Responses per prompt in a step (the per-prompt baseline, score_norm "prompt", needs 2 or more)."""

    prompt_pool: int = 2
    """Training prompts the runs draw from (the first Nectar training prompts that fit
    max_prompt_tokens); 0 takes them all. Equal to rollouts_per_step / responses_per_prompt,
    every step sees the same prompts, so its mean reward compares with the initial policy's."""

    max_prompt_tokens: int = 96
    """Prompts longer than this in the policy's chat format are skipped."""

    max_new_tokens: int = 24
    """Most tokens per response."""

    top_k: int = 50
    """Sample among the k most likely tokens; 0 the full softmax."""

    lr: float = 1e-3
    """Learning rate of the policy's trained layers: higher than notebook 04's, to push far in few steps."""

    unfrozen_layers: int = 2
    """Top decoder layers of the policy trained."""

    minibatch_size: int = 8
    """Responses per optimizer step."""

    micro_batch_size: int = 8
    """Responses per forward/backward."""

    epochs_per_batch: int = 2
    """Passes over each rollout batch."""

    score_norm: str = "prompt"
    """Baseline of the proxy's scores: "prompt", "center", "whiten" or "none" (PolicyTrainConfig.score_norm)."""

    lam: float = 0.1
    """APA's lambda (its pull towards the initial policy)."""

    beta: float = 0.0
    """PPO's KL penalty coefficient: 0 (no penalty) lets the policy drift, as Gao et al.'s main RL runs."""

    smooth_steps: int = 3
    """Steps in the centred rolling mean of the curves before their peak is read (1: none)."""

    nectar_source: str = "bundled"
    """Where the prompts come from (and the proxy's rankings): "bundled", a hub id or a file."""

    device: str = "auto"
    """"auto" (a GPU when there is one), "cpu" or "cuda"."""

    seed: int = 0
    """First seed of the policy runs; the proxy and the prompt split use the gold model's seed."""

    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        from starling_lib.policy.methods import ONLINE_METHODS

        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError(f"methods must name at least one of {', '.join(ONLINE_METHODS)}; got none")
        unknown = [m for m in self.methods if m not in ONLINE_METHODS]
        if unknown:
            raise ValueError(f"methods: {', '.join(unknown)} not online methods; allowed: {', '.join(ONLINE_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        if not 0 < self.proxy_fraction <= 1:
            raise ValueError(f"proxy_fraction must lie in (0, 1] (the share of the gold model's training prompts); "
                             f"got {self.proxy_fraction!r}")
        for name, low in (("seeds", 1), ("steps", 2), ("rollouts_per_step", 1), ("responses_per_prompt", 1),
                          ("max_prompt_tokens", 1), ("max_new_tokens", 1), ("smooth_steps", 1),
                          ("minibatch_size", 1), ("micro_batch_size", 1), ("epochs_per_batch", 1),
                          ("proxy_steps", 0), ("prompt_pool", 0), ("top_k", 0), ("unfrozen_layers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be greater than 0; got {self.lr!r}")
        if self.beta < 0 or not self.lam > 0:
            raise ValueError(f"beta must be at least 0 and lam greater than 0; got beta={self.beta!r}, lam={self.lam!r}")
        proxy_overrides(self.proxy_settings)   # known RMTrainConfig fields, well-formed
        for method in self.methods:   # the policy runs' own checks (batch sizes, the baseline), before anything loads
            policy_config(self, method, self.seed)

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def policy_config(cfg: OveroptConfig, method: str, seed: int, max_prompts: int = 0):
    """The PolicyTrainConfig of one run against the proxy (the scorer is passed to train_online)."""
    from starling_lib.policy.config import PolicyTrainConfig

    return PolicyTrainConfig(
        policy=cfg.policy, reward_model="<proxy, in memory>", method=method, nectar_source=cfg.nectar_source,
        max_prompts=max_prompts, max_prompt_tokens=cfg.max_prompt_tokens, steps=cfg.steps,
        rollouts_per_step=cfg.rollouts_per_step, responses_per_prompt=cfg.responses_per_prompt,
        minibatch_size=cfg.minibatch_size, micro_batch_size=cfg.micro_batch_size, epochs_per_batch=cfg.epochs_per_batch,
        max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, lr=cfg.lr, unfrozen_layers=cfg.unfrozen_layers,
        score_norm=cfg.score_norm, lam=cfg.lam, beta=cfg.beta, device=cfg.device, seed=seed, eval_every=0,
        progress=cfg.progress, report_to="none", save_policy=False)


# --------------------------------------------------------------------------------------------
# the reward models


def gold_training(gold_dir: str | Path) -> dict[str, Any]:
    """The gold reward model's recorded training settings (`reward_model.json`'s "training")."""
    import json

    from starling_lib.rm_io import CONFIG_FILE

    info = json.loads((Path(gold_dir) / CONFIG_FILE).read_text())
    if "training" not in info:
        raise ValueError(f"{gold_dir}: {CONFIG_FILE} records no training settings, so a proxy cannot match them "
                         "(a released reward model? the gold model must be one rm_train saved)")
    return dict(info["training"])


def proxy_overrides(text: str) -> dict[str, Any]:
    """`proxy_settings` as a dict of RMTrainConfig settings (ValueError for an unknown or malformed one)."""
    from starling_lib.rm_train import RMTrainConfig
    from starling_lib.runs import coerce_setting, parse_sets

    items = [item.strip() for item in text.split(",") if item.strip()]
    items = [item if "=" in item else item.replace(":", "=", 1) for item in items]   # name:value or name=value
    text_fields = [n for n, f in RMTrainConfig.__dataclass_fields__.items() if isinstance(f.default, str)]
    values = parse_sets(items, text_fields)
    for name in ("train_prompts", "steps"):
        if name in values:
            raise ValueError(f"proxy_settings: {name} is set by proxy_fraction / proxy_steps, not here")
    try:
        return {k: coerce_setting(RMTrainConfig, k, v) for k, v in values.items()}
    except TypeError as e:
        raise ValueError(f"proxy_settings: {e}") from e


def proxy_config(cfg: OveroptConfig, gold_dir: str | Path, output_dir: str | Path = ""):
    """(RMTrainConfig of the proxy, gold's number of training prompts): the gold model's recorded
    settings with `train_prompts` = proxy_fraction x gold's (at least 2) and proxy_steps steps (0:
    the gold model's scaled by the same share, the same number of epochs). Nothing else changes
    (same body, split, max length, trained layers, lr, seed) unless `proxy_settings` says so."""
    from starling_lib.rm_train import RMTrainConfig, load_rankings

    training = gold_training(gold_dir)
    known = set(RMTrainConfig.__dataclass_fields__)
    settings = {**{k: v for k, v in training.items() if k in known}, **proxy_overrides(cfg.proxy_settings)}
    gold_cfg = RMTrainConfig(**{**settings, "device": cfg.device, "progress": False, "report_to": "none"})
    available = len(load_rankings(RMTrainConfig(**{**settings, "train_prompts": 0}))["train"])
    gold_n = min(gold_cfg.train_prompts or available, available)
    n = max(2, round(cfg.proxy_fraction * gold_n))
    steps = cfg.proxy_steps or max(1, round(gold_cfg.steps * n / gold_n))
    proxy = RMTrainConfig(**{**settings, "train_prompts": n, "steps": steps,
                             "device": cfg.device, "output_dir": str(output_dir), "save_model": bool(output_dir),
                             "eval_every": 0, "progress": cfg.progress, "report_to": "none", "checkpoint_every": 0,
                             "cache_trunk": settings.get("unfrozen_layers", -1) >= 0})
    return proxy, gold_n


class DualScorer:
    """The scorer a policy is tuned against: the proxy's scores go to the trainer, and the gold
    model scores the same (prompt, response) pairs, one record per call (per rollout step)."""

    def __init__(self, proxy, gold, batch_size: int = 16):
        self.proxy, self.gold, self.batch_size = proxy, gold, batch_size
        self.records: list[dict[str, Any]] = []

    def score(self, prompts, responses, batch_size: int | None = None, progress: bool = False, **_) -> torch.Tensor:
        prompts, responses = list(prompts), list(responses)
        batch_size = batch_size or self.batch_size
        proxy = self.proxy.score(prompts, responses, batch_size=batch_size).float().cpu()
        gold = self.gold.score(prompts, responses, batch_size=batch_size).float().cpu()
        self.records.append({"prompts": prompts, "responses": responses, "proxy": proxy.clone(), "gold": gold.clone()})
        return proxy


# --------------------------------------------------------------------------------------------
# the experiment


@dataclass
class OveroptResult:
    """What `run_overoptimisation` returns."""

    config: OveroptConfig
    curves: pd.DataFrame          # one row per (method, seed, step): kl, sqrt_kl, gold / proxy raw means and gains
    samples: list[dict]           # per (method, seed, step): prompts, responses, gold and proxy scores (tensors)
    initial: dict[str, dict]      # per RM: mean and sd of the initial policy's scores (every run's step 0)
    correlation: float            # gold vs proxy scores of the initial policy's responses (Pearson)
    pool_size: int                # training prompts the runs drew from
    wall_s: dict[str, float] = field(default_factory=dict)   # seconds per method (all seeds)


def pool_max_prompts(cfg: OveroptConfig, tokenizer) -> tuple[int, int]:
    """(max_prompts, pool size): the fewest Nectar records whose training split holds `prompt_pool`
    prompts that fit (0, all of them, when prompt_pool is 0). Records are split by a hash of each
    prompt, so reading one more adds at most one training prompt."""
    from starling_lib.policy.prompts import load_prompts

    if cfg.prompt_pool == 0:
        return 0, len(load_prompts(policy_config(cfg, cfg.methods[0], cfg.seed), tokenizer)[0])
    n = cfg.prompt_pool
    while True:
        try:
            train, _ = load_prompts(policy_config(cfg, cfg.methods[0], cfg.seed, max_prompts=n), tokenizer)
        except ValueError:   # no training prompt fits yet
            train = []
        if len(train) >= cfg.prompt_pool:
            return n, len(train)
        n += 1
        if n > 100_000:
            raise ValueError(f"fewer than prompt_pool={cfg.prompt_pool} training prompts fit max_prompt_tokens")


def run_overoptimisation(cfg: OveroptConfig, gold, proxy) -> OveroptResult:
    """Tune the initial policy against `proxy` with each method and seed, recording the gold and
    proxy scores of every rollout (a DualScorer) and the KL to the initial policy; then the curves."""
    from starling_lib.models import load_tokenizer
    from starling_lib.policy.online import train_online
    from starling_lib.policy.prompts import resolve_policy

    tokenizer = load_tokenizer(resolve_policy(cfg.policy))
    max_prompts, pool = pool_max_prompts(cfg, tokenizer)
    rows, samples, wall = [], [], {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        for seed in cfg.seed_list:
            scorer = DualScorer(proxy, gold)
            res = train_online(policy_config(cfg, method, seed, max_prompts), reward_model=scorer)
            if len(scorer.records) != len(res.history):
                raise RuntimeError(f"{len(scorer.records)} scoring calls for {len(res.history)} steps")
            for h, rec in zip(res.history, scorer.records):
                step = h["step"] - 1      # the rollout of step s is the policy after s updates (0: initial)
                rows.append({"method": method, "seed": seed, "step": step, "kl": h[f"policy/{method}/kl"],
                             "gold": float(rec["gold"].mean()), "proxy": float(rec["proxy"].mean()),
                             "response_length": h[f"policy/{method}/response_length"]})
                samples.append({"method": method, "seed": seed, "step": step, **rec})
            del res
        wall[method] = time.perf_counter() - t0
    curves = pd.DataFrame(rows)
    first = [s for s in samples if s["step"] == 0]
    initial = {k: {"mean": float(torch.cat([s[k] for s in first]).mean()),
                   "sd": float(torch.cat([s[k] for s in first]).std())} for k in RM_KEYS}
    curves = add_gains(curves, initial)
    g0, p0 = torch.cat([s["gold"] for s in first]), torch.cat([s["proxy"] for s in first])
    corr = float(np.corrcoef(g0.numpy(), p0.numpy())[0, 1]) if len(g0) > 2 else math.nan
    return OveroptResult(config=cfg, curves=curves, samples=samples, initial=initial, correlation=corr,
                         pool_size=pool, wall_s=wall)


def add_gains(curves: pd.DataFrame, initial: dict[str, dict]) -> pd.DataFrame:
    """Add sqrt_kl and, per RM, gain = (mean score - initial mean) / initial sd (columns gold_gain, proxy_gain)."""
    out = curves.copy()
    out["sqrt_kl"] = np.sqrt(out["kl"].clip(lower=0.0))
    for k in RM_KEYS:
        sd = initial[k]["sd"] if initial[k]["sd"] > 0 else 1.0
        out[f"{k}_gain"] = (out[k] - initial[k]["mean"]) / sd
    return out


# --------------------------------------------------------------------------------------------
# reading the curves


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling mean over `window` steps (shorter at the ends)."""
    if window <= 1:
        return np.asarray(values, dtype=float)
    return pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy()


def mean_curve(curves: pd.DataFrame, method: str, rm: str) -> pd.DataFrame:
    """Per step: mean over seeds of sqrt_kl and of the RM's gain, with their s.e. and 95% t-interval."""
    from starling_lib.stats import t_interval

    sub = curves[curves["method"] == method]
    rows = []
    for step, g in sub.groupby("step"):
        gain, d = t_interval(g[f"{rm}_gain"]), t_interval(g["sqrt_kl"])
        rows.append({"step": int(step), "seeds": gain["n"], "sqrt_kl": d["mean"], "sqrt_kl_se": d["se"],
                     "kl": float(g["kl"].mean()), "gain": gain["mean"], "gain_se": gain["se"],
                     "gain_low": gain["ci95_low"], "gain_high": gain["ci95_high"]})
    return pd.DataFrame(rows)


def curve_summary(curves: pd.DataFrame, method: str, rm: str, smooth_steps: int = 1) -> dict[str, float]:
    """The peak of one RM's gain curve for one method, read from the mean over seeds.

    peak_step: the step where the mean gain, smoothed by a centred rolling mean of `smooth_steps`
    steps, is highest; peak_gain its smoothed value (s.e. over seeds of each seed's smoothed gain
    there), peak_kl / peak_sqrt_kl the mean KL and sqrt(KL) over seeds at that step; final_gain the
    smoothed gain at the last step; start_gain the mean gain of the first batch (unsmoothed: the
    initial policy's); rise = final_gain - start_gain with its s.e. and interval over seeds and
    rises (whether the interval lies above 0); fall = peak_gain - final_gain, with its s.e. and 95% t-interval
    over seeds of the per-seed differences (paired: the same seed's curve at both steps); falls:
    whether that interval lies above 0; peaked_inside: whether the peak is before the last step.
    The argmax is taken on the same noisy curve the fall is read from, so with few seeds the fall
    is biased upwards: read it with its interval.
    """
    from starling_lib.stats import t_interval

    sub = curves[curves["method"] == method].sort_values("step")
    wide = sub.pivot(index="step", columns="seed", values=f"{rm}_gain")
    kl = sub.pivot(index="step", columns="seed", values="kl")
    per_seed = np.stack([_smooth(wide[c].to_numpy(), smooth_steps) for c in wide.columns], axis=1)  # (steps, seeds)
    mean = per_seed.mean(axis=1)
    i = int(np.argmax(mean))
    peak, final = t_interval(per_seed[i]), t_interval(per_seed[-1])
    fall = t_interval(per_seed[i] - per_seed[-1])
    start = wide.iloc[0].to_numpy(dtype=float)                 # unsmoothed: the initial policy's own batch
    rise = t_interval(per_seed[-1] - start)
    return {"start_gain": float(start.mean()), "rise": rise["mean"], "rise_se": rise["se"],
            "rise_low": rise["ci95_low"], "rise_high": rise["ci95_high"], "rises": bool(rise["ci95_low"] > 0),
            "peak_step": int(wide.index[i]), "peak_gain": peak["mean"], "peak_gain_se": peak["se"],
            "peak_kl": float(kl.iloc[i].mean()), "peak_sqrt_kl": float(np.sqrt(kl.iloc[i].clip(lower=0)).mean()),
            "final_step": int(wide.index[-1]), "final_gain": final["mean"], "final_gain_se": final["se"],
            "final_kl": float(kl.iloc[-1].mean()), "final_sqrt_kl": float(np.sqrt(kl.iloc[-1].clip(lower=0)).mean()),
            "fall": fall["mean"], "fall_se": fall["se"], "fall_low": fall["ci95_low"], "fall_high": fall["ci95_high"],
            "falls": bool(fall["ci95_low"] > 0), "peaked_inside": bool(i < len(mean) - 1), "seeds": int(wide.shape[1])}


def fit_gao_forms(sqrt_kl: Sequence[float], gain: Sequence[float]) -> dict[str, float]:
    """Least-squares fits of Gao et al.'s forms through the origin, d = sqrt(KL):
    RL: gain = d (alpha - beta ln d); best-of-n: gain = d (alpha - beta d). Both are linear in
    (alpha, beta). Returns rl_alpha, rl_beta, rl_peak_d (exp(alpha / beta - 1), where the RL form
    peaks, NaN unless beta > 0) and rl_peak_kl (its square), bon_alpha, bon_beta, bon_peak_d (alpha / 2 beta) and each fit's r2.
    Points with d = 0 carry no information about either form (both are 0 there) and are dropped."""
    d, y = np.asarray(sqrt_kl, dtype=float), np.asarray(gain, dtype=float)
    keep = (d > 0) & np.isfinite(d) & np.isfinite(y)
    d, y = d[keep], y[keep]
    out = {}
    for name, second in (("rl", -d * np.log(d) if len(d) else d), ("bon", -d * d)):
        if len(d) < 3:
            out.update({f"{name}_alpha": math.nan, f"{name}_beta": math.nan, f"{name}_peak_d": math.nan,
                        f"{name}_peak_kl": math.nan, f"{name}_r2": math.nan})
            continue
        X = np.stack([d, second], axis=1)
        (alpha, beta), *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ np.array([alpha, beta])
        ss = float(((y - y.mean()) ** 2).sum())
        if beta > 0:
            peak = math.exp(alpha / beta - 1) if name == "rl" and alpha / beta - 1 < 50 else (
                alpha / (2 * beta) if name == "bon" else math.inf)
        else:
            peak = math.nan
        out.update({f"{name}_alpha": float(alpha), f"{name}_beta": float(beta), f"{name}_peak_d": float(peak),
                    f"{name}_peak_kl": float(peak) ** 2 if math.isfinite(peak) else math.nan,
                    f"{name}_r2": 1 - float((resid ** 2).sum()) / ss if ss > 0 else math.nan})
    return out


def fitted_curve(fit: dict[str, float], form: str, d: np.ndarray) -> np.ndarray:
    """The fitted form ("rl" or "bon") at sqrt(KL) values d."""
    d = np.asarray(d, dtype=float)
    a, b = fit[f"{form}_alpha"], fit[f"{form}_beta"]
    if form == "rl":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, d * (a - b * np.log(np.where(d > 0, d, 1.0))), 0.0)
    return d * (a - b * d)


def summarise(result: OveroptResult) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {rm: curve_summary + fit_gao_forms}} for every method and RM."""
    out = {}
    for method in result.config.methods:
        out[method] = {}
        for rm in RM_KEYS:
            sub = result.curves[result.curves["method"] == method]
            out[method][rm] = {**curve_summary(result.curves, method, rm, result.config.smooth_steps),
                               **fit_gao_forms(sub["sqrt_kl"], sub[f"{rm}_gain"])}
    return out


def gap_at_end(curves: pd.DataFrame, method: str) -> dict[str, float]:
    """Proxy gain minus gold gain at the last step, with its s.e. over seeds (paired per seed)."""
    from starling_lib.stats import t_interval

    sub = curves[(curves["method"] == method) & (curves["step"] == curves["step"].max())]
    gap = t_interval(sub["proxy_gain"] - sub["gold_gain"])
    return {"gap": gap["mean"], "gap_se": gap["se"], "gap_low": gap["ci95_low"], "gap_high": gap["ci95_high"]}


def overoptimisation_metrics(result: OveroptResult, summary: dict | None = None, proxy_info: dict | None = None,
                             notebook_s: float | None = None) -> dict[str, Any]:
    """The namespaced metrics of notebook 07: `overopt/...`."""
    summary = summary or summarise(result)
    cfg = result.config
    m: dict[str, Any] = {"overopt/methods": list(cfg.methods), "overopt/seeds": cfg.seeds, "overopt/steps": cfg.steps,
                         "overopt/pool_size": result.pool_size, "overopt/initial_correlation": result.correlation,
                         "overopt/rollouts": int(len(result.samples) * cfg.rollouts_per_step)}
    for rm in RM_KEYS:
        m[f"overopt/initial/{rm}_mean"] = result.initial[rm]["mean"]
        m[f"overopt/initial/{rm}_sd"] = result.initial[rm]["sd"]
    for method, by_rm in summary.items():
        for rm, s in by_rm.items():
            for k, v in s.items():
                m[f"overopt/{method}/{rm}/{k}"] = v
        for k, v in gap_at_end(result.curves, method).items():
            m[f"overopt/{method}/{k}"] = v
        m[f"overopt/{method}/wall_s"] = result.wall_s.get(method)
    m["overopt/curves"] = result.curves.round(6).to_dict(orient="records")
    for k, v in (proxy_info or {}).items():
        m[f"overopt/proxy/{k}"] = v
    if notebook_s is not None:
        m["overopt/notebook_s"] = notebook_s
    return m


# --------------------------------------------------------------------------------------------
# notebook 07's helpers


def config_from_params(params: dict[str, Any]) -> OveroptConfig:
    """The OveroptConfig of notebook 07's parameters (every parameter named like a field; the methods
    from `rl_methods`, comma-separated text: a run config's `--set methods=...` is notebook 04's)."""
    from starling_lib.runs import config_from_params as from_params

    methods = tuple(m.strip() for m in str(params.get("rl_methods", "apa,ppo")).split(",") if m.strip())
    return from_params(OveroptConfig, params, methods=methods)


def find_gold_reward_model(run_dir, gold_reward_model: str = "", steps: int = 30, device: str = "auto",
                           seed: int = 0) -> Path:
    """The gold reward model's folder: `gold_reward_model` when given, else notebook 03's in this run
    (trained here as notebook 04 does when missing: policy.load_or_train_reward_model)."""
    from starling_lib.policy.io import load_or_train_reward_model

    if gold_reward_model:
        path = Path(gold_reward_model)
        gold_training(path)   # a clear error when it is not a folder rm_train saved
        return path
    path, _ = load_or_train_reward_model(run_dir, steps=steps, device=device, seed=seed, progress=False)
    return path


def train_proxy(proxy_cfg):
    """Train the proxy (`rm_train.train_reward_model`; saved to proxy_cfg.output_dir/reward_model when set)."""
    from starling_lib.rm_train import train_reward_model

    return train_reward_model(proxy_cfg)


def load_gold(gold_dir, device: str = "auto"):
    """The gold reward model, in eval mode (`rm_io.load_reward_model`)."""
    from starling_lib.rm_io import load_reward_model

    return load_reward_model(gold_dir, device=None if device == "auto" else device)


def heldout_comparison(gold, proxy, proxy_cfg, prompts: int, batch_size: int = 16) -> dict[str, float]:
    """Gold and proxy ranking the answers of the first `prompts` held-out Nectar prompts (the split
    both were trained beside): each one's pair accuracy against Nectar's ranking, gold minus proxy
    paired by prompt (mean, s.e., 95% t-interval), and the correlation of their scores."""
    from starling_lib.rm_eval import prompt_scores
    from starling_lib.rm_train import load_rankings
    from starling_lib.stats import paired_interval

    rows = load_rankings(proxy_cfg)["test"]
    rows = [rows[i] for i in range(min(prompts, len(rows)))]
    flat_prompts = [row["messages"] for row in rows for _ in row["answers"]]
    flat_answers = [a for row in rows for a in row["answers"]]
    bounds = np.cumsum([0] + [len(row["answers"]) for row in rows])
    scores = {"gold": gold.score(flat_prompts, flat_answers, batch_size=batch_size).numpy(),
              "proxy": proxy.score(flat_prompts, flat_answers, batch_size=batch_size).numpy()}
    acc = {k: [prompt_scores(v[bounds[i]:bounds[i + 1]])["pair_accuracy"] for i in range(len(rows))]
           for k, v in scores.items()}
    pairs = np.array([len(row["answers"]) * (len(row["answers"]) - 1) / 2 for row in rows])
    diff = paired_interval(acc["gold"], acc["proxy"])
    return {"prompts": len(rows), "answers": len(flat_answers),
            **{f"{k}_pair_accuracy": float((np.array(a) * pairs).sum() / pairs.sum()) for k, a in acc.items()},
            "diff": diff["mean"], "diff_se": diff["se"], "diff_low": diff["ci95_low"], "diff_high": diff["ci95_high"],
            "score_correlation": float(np.corrcoef(scores["gold"], scores["proxy"])[0, 1])}


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt)


def samples_frame(result: OveroptResult, steps: Sequence[int] = ()) -> pd.DataFrame:
    """One row per scored response (of the given steps; all when empty): method, seed, step, batch
    ("first batch" is the initial policy's, "last batch" the final step's), prompt, response, proxy, gold."""
    last = max(s["step"] for s in result.samples)
    rows = []
    for s in result.samples:
        if steps and s["step"] not in steps:
            continue
        label = "first batch (initial policy)" if s["step"] == 0 else (
            f"last batch (step {s['step']})" if s["step"] == last else f"step {s['step']}")
        for p, r, px, g in zip(s["prompts"], s["responses"], s["proxy"].tolist(), s["gold"].tolist()):
            rows.append({"method": s["method"], "seed": s["seed"], "step": s["step"], "batch": label,
                         "prompt": _prompt_text(p), "response": r, "proxy": px, "gold": g})
    return pd.DataFrame(rows)


def proxy_info(proxy_result, gold_train_prompts: int, heldout: dict | None = None) -> dict[str, Any]:
    """The proxy's facts for the metrics: prompts, steps, seconds, and the held-out comparison."""
    cfg = proxy_result.config
    return {"train_prompts": cfg.train_prompts, "gold_train_prompts": gold_train_prompts, "steps": cfg.steps,
            "wall_s": proxy_result.wall_s, **{f"heldout_{k}": v for k, v in (heldout or {}).items()}}


def readings(result: OveroptResult, summary: dict, heldout: dict | None = None, proxy_cfg=None,
             gold_n: int | None = None) -> list[str]:
    """Notebook 07's readings, one line each, every number one `overoptimisation_metrics` records."""
    from starling_lib.stats import format_interval

    cfg = result.config
    lines = []
    proxy_parts = []
    for method, by_rm in summary.items():
        p = by_rm["proxy"]
        proxy_parts.append(f"{method.upper()} {p['start_gain']:+.2f} at step 0 -> {p['final_gain']:+.2f} +- "
                           f"{p['final_gain_se']:.2f} at step {p['final_step']} (KL {p['final_kl']:.2f}), a rise of "
                           f"{p['rise']:+.2f} {format_interval(p['rise_low'], p['rise_high'])}: "
                           f"{'it rose' if p['rises'] else 'no rise beyond the noise'}")
    lines.append(f"Proxy gain over {cfg.seeds} seeds (smoothed over {cfg.smooth_steps} steps): " + "; ".join(proxy_parts) + ".")
    peak_parts = []
    for method, by_rm in summary.items():
        g = by_rm["gold"]
        where = ("the last step: no peak inside the budget" if not g["peaked_inside"]
                 else f"KL {g['peak_kl']:.2f}, d {g['peak_sqrt_kl']:.2f}")
        peak_parts.append(f"{method.upper()} highest at step {g['peak_step']} of {g['final_step']}, "
                          f"{g['peak_gain']:+.2f} +- {g['peak_gain_se']:.2f} ({where})")
    lines.append("Gold gain: " + "; ".join(peak_parts) + ".")
    fall_parts = []
    for method, by_rm in summary.items():
        g = by_rm["gold"]
        if not g["peaked_inside"]:
            fall_parts.append(f"{method.upper()} none to read (the peak is the last step; gold gain at the end "
                              f"{g['final_gain']:+.2f} +- {g['final_gain_se']:.2f})")
            continue
        verdict = "the gold reward fell: over-optimisation" if g["falls"] else "indistinguishable from no fall"
        fall_parts.append(f"{method.upper()} {g['fall']:+.2f} +- {g['fall_se']:.2f} from step {g['peak_step']} to step "
                          f"{g['final_step']} (KL {g['peak_kl']:.2f} -> {g['final_kl']:.2f}), 95% interval "
                          f"{format_interval(g['fall_low'], g['fall_high'])}: {verdict}")
    lines.append("Fall of the gold gain after its peak: " + "; ".join(fall_parts) + ".")
    gap_parts = []
    for method, by_rm in summary.items():
        gap = gap_at_end(result.curves, method)
        g = by_rm["gold"]
        fit = (f"RL form fitted to gold alpha {g['rl_alpha']:+.2f}, beta {g['rl_beta']:+.2f}, "
               + (f"bending down to a peak at d {g['rl_peak_d']:.2f} (KL {g['rl_peak_kl']:.2f})"
                  if math.isfinite(g["rl_peak_d"]) else "not bending down") + f", r2 {g['rl_r2']:.2f}")
        gap_parts.append(f"{method.upper()} proxy minus gold at the end {gap['gap']:+.2f} +- {gap['gap_se']:.2f}; {fit}")
    lines.append("; ".join(gap_parts) + ".")
    models = (f"Reward models: the proxy trained on {proxy_cfg.train_prompts} of the gold model's {gold_n} training "
              f"prompts, {proxy_cfg.steps} steps" if proxy_cfg is not None else "Reward models:")
    if heldout:
        models += (f"; held-out pair accuracy over {heldout['prompts']} prompts gold {heldout['gold_pair_accuracy']:.3f}, "
                   f"proxy {heldout['proxy_pair_accuracy']:.3f}, gold minus proxy {heldout['diff']:+.3f} "
                   f"{format_interval(heldout['diff_low'], heldout['diff_high'], 3)}")
    models += (f"; on the initial policy's responses their scores correlate {result.correlation:.2f}, "
               f"over {result.pool_size} training prompts.")
    lines.append(models)
    return lines
