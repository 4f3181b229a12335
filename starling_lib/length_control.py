"""AlpacaEval's length-controlled win rate, fitted by the `alpaca_eval` package's own GLM.

Dubois et al. (2024), *Length-Controlled AlpacaEval*, arXiv:2404.04475; code:
alpaca_eval/metrics/glm_winrate.py (alpaca_eval 0.6.6). With p in [1, 2] the judge's preference
for the model (2: the model wins) and lengths in characters,

    logit P(model preferred | x) = phi tanh((len_baseline(x) - len_model(x)) / std) [+ psi gamma_x] + theta
    LC = 100 mean_x sigmoid(theta [+ psi gamma_x])            (the length term at zero)

fitted to the soft labels p - 1 by alpaca_eval's `fit_LogisticRegressionCV` (L1 penalty, liblinear,
no intercept, C chosen by 5-fold GroupKFold cross-validation of the soft-label log-loss) on the
design matrix its `make_dmatrix_for_model` builds from its formula (`GLM_INFO`).

Which GLM (`glm`):
  * "length_controlled_v1", AlpacaEval 2.0's: adds the instruction difficulty gamma_x (fitted once
    by the AlpacaEval authors on every leaderboard model's annotations) and regularises the fit
    towards two "gamed" baselines (the baseline prompted to be verbose and to be concise; weight
    0.2 / 2 each). Both come from one file of the hub dataset tatsu-lab/alpaca_eval, df_gamed.csv,
    and gamma_x is looked up by AlpacaEval instruction index, so the instructions must be
    AlpacaEval's. The point estimate is `get_length_controlled_winrate` itself.
  * "length_controlled_minimal": alpaca_eval's formula with the length and model terms only, no
    regularisation. alpaca_eval never falls back to it by itself: its function downloads
    df_gamed.csv for every GLM and fails without it. Here it is fitted offline from alpaca_eval's
    formula, design-matrix builder and fitter, on alpaca_eval's featurisation (`_features`, mirrored
    from its `_get_featurized_data`); tests/test_alpaca.py checks it against alpaca_eval's own
    function on the same annotations.
  * "auto": v1 when df_gamed.csv can be had (from the hub or its local cache) and every
    instruction is AlpacaEval's, otherwise the minimal GLM, with a warning that names it and why.
    As in alpaca_eval, nothing checks the baseline: the gamed baselines and gamma_x belong to
    AlpacaEval 2.0 (baseline gpt4_1106_preview, GPT-4 Turbo judge), so a v1 fit against
    text_davinci_003 or with another judge borrows them from a different setting.

Uncertainty:
  * `lc_standard_error` is alpaca_eval's: the standard error of the mean of the per-instruction
    predictions, x 100. It measures how much the prediction varies over instructions (through
    gamma_x), not how well the fit is determined; for the minimal GLM every prediction is the same
    and it is 0.
  * `lc_bootstrap_se` (not in alpaca_eval): the standard deviation of LC over `n_bootstrap`
    resamples of the instructions, each refitted (the gamed baselines' rows, when used, are kept
    as they are). Compare models with this one.

Departures from alpaca_eval:
  * the minimal GLM without the hub file (above), and the bootstrap standard error;
  * fewer than 5 judged instructions: LC is NaN, with a warning (alpaca_eval's 5-fold
    cross-validation raises an sklearn error);
  * a length difference with zero spread (every difference equal) makes the length feature 0,
    where alpaca_eval divides by zero; it only arises in degenerate bootstrap resamples;
  * importing alpaca_eval sets the root logger to INFO (annotators/base.py) and its win-rate
    function then attaches a stderr handler; both are undone after each call, and alpaca_eval's
    warning that LC and the raw win rate differ a lot is raised as a Python warning instead;
  * liblinear's ConvergenceWarnings (common with a handful of instructions, at the largest C of the
    cross-validation grid) are counted and said in one warning per call, and the reason for the
    minimal GLM once per process, rather than once per solve and per model.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

_WARNED: set[str] = set()  # reasons for the minimal GLM already warned about in this process
GLMS = ("auto", "length_controlled_v1", "length_controlled_minimal")
MIN_JUDGED = 5            # alpaca_eval's cross-validation folds (GLM_INFO[...]["kwargs"]["n_splits"])
HUB_DATASET = "tatsu-lab/alpaca_eval"
GAMED_FILE = "df_gamed.csv"
# alpaca_eval's coefficient names (patsy terms of its formulas) -> short names
TERMS = {"np.tanh(std_delta_len)": "length", "instruction_difficulty": "instruction_difficulty",
         "not_gamed_baseline.astype(float)": "model"}


@dataclass
class LCResult:
    """A length-controlled win rate and how it was fitted."""

    lc_win_rate: float          # x 100; NaN with fewer than MIN_JUDGED judged instructions
    lc_standard_error: float    # alpaca_eval's: s.e. of the mean per-instruction prediction, x 100 (0 for minimal)
    lc_bootstrap_se: float      # s.d. of lc_win_rate over resampled instructions, each refitted
    glm: str                    # "length_controlled_v1" or "length_controlled_minimal"
    weights: dict = field(default_factory=dict)  # TERMS' short names -> coefficient (length: baseline minus model)
    reason: str = ""            # why the minimal GLM was fitted, when "auto" could not fit v1


@contextmanager
def glm_module() -> Iterator:
    """alpaca_eval.metrics.glm_winrate, with the caller's logging and warnings kept as they were."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with warnings.catch_warnings():
            # alpaca_eval imports pkg_resources; sklearn 1.8+ deprecates arguments alpaca_eval passes
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            warnings.filterwarnings("ignore", category=FutureWarning)
            from alpaca_eval.metrics import glm_winrate
            yield glm_winrate
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@functools.lru_cache(maxsize=1)
def load_gamed() -> tuple[pd.DataFrame | None, str]:
    """df_gamed.csv from the hub dataset (or its cache), as alpaca_eval downloads it: (frame, "") or
    (None, why not). Asked once per process (`load_gamed.cache_clear()` asks again), so that a
    machine without the hub waits for its timeout once, not once per model."""
    from huggingface_hub import hf_hub_download

    with glm_module() as g:
        constants = g.constants
    try:
        path = hf_hub_download(repo_id=HUB_DATASET, filename=GAMED_FILE, repo_type="dataset",
                               token=constants.DATASETS_TOKEN, cache_dir=constants.DEFAULT_CACHE_DIR)
    except Exception as e:  # offline, no cache, no network, no access: every way of not having it
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{GAMED_FILE} of the hub dataset {HUB_DATASET} is not available ({type(e).__name__}: {first_line})"
    return pd.read_csv(path).drop(columns=["model"]), ""


def _features(preference: np.ndarray, len_1: np.ndarray, len_2: np.ndarray,
              alpaca_index: np.ndarray | None, gamed: pd.DataFrame | None) -> pd.DataFrame:
    """alpaca_eval's `_get_featurized_data`, step 2: one row per instruction (output_1 = baseline)."""
    delta = pd.Series(len_1 - len_2, dtype=float)           # baseline minus model, as alpaca_eval
    std = delta.std()
    df = pd.DataFrame({"preference": pd.Series(preference, dtype=float).replace({0.0: 1.5}) - 1,
                       "std_delta_len": delta / std if std > 0 else 0.0})
    if gamed is not None:
        # alpaca_eval looks gamma_x up by the row label of the first row of each index in df_gamed
        difficulty = gamed.drop_duplicates("index")["instruction_difficulty"]
        df["index"] = alpaca_index
        df["instruction_difficulty"] = difficulty.loc[alpaca_index].to_numpy()
    df["not_gamed_baseline"] = True
    return df


def _fit(g, df: pd.DataFrame, glm: str, gamed: pd.DataFrame | None) -> tuple[np.ndarray, dict]:
    """alpaca_eval's fit of `glm` on featurised rows: (per-instruction predictions at zero length difference, weights)."""
    info = g.GLM_INFO[glm]
    test = df[[c for c in ("instruction_difficulty", "not_gamed_baseline") if c in df]].copy()
    test["std_delta_len"] = 0
    train, weight = df, None
    if info["regularize_to_baseline_lambda"]:
        train = pd.concat([gamed, df], axis=0)
        not_gamed = train["not_gamed_baseline"].astype(bool).to_numpy()
        weight = not_gamed + info["regularize_to_baseline_lambda"] * (~not_gamed) / 2
    X_train, X_test = g.make_dmatrix_for_model(train, test, formula=info["formula"])
    judged = X_train["preference"].notna().to_numpy()
    model = g.fit_LogisticRegressionCV(X_train[judged], "preference", is_ytrue_proba=True,
                                       sample_weight=None if weight is None else weight[judged], **info["kwargs"])
    weights = {TERMS.get(k, k): float(v) for k, v in zip(X_test.columns, model.coef_[0])}
    return model.predict_proba(X_test)[:, 1], weights


def _official_v1(g, preference, output_1, output_2, alpaca_index) -> tuple[np.ndarray, dict, float]:
    """alpaca_eval's `get_length_controlled_winrate` with its v1 GLM: (per-instruction predictions,
    weights, LC). The weights are not returned, only saved: they are read back from a temporary folder."""
    annotations = pd.DataFrame({"preference": preference, "output_1": list(output_1), "output_2": list(output_2),
                                "index": alpaca_index, "generator_1": "baseline", "generator_2": "model"})
    with tempfile.TemporaryDirectory() as tmp:
        out = g.get_length_controlled_winrate(annotations, glm_name="length_controlled_v1", save_weights_dir=tmp,
                                              is_warn_extreme_changes=False)
        saved = pd.read_csv(Path(tmp) / "length_controlled_v1" / "baseline_baseline.csv", index_col=0).loc["model"]
    weights = {TERMS.get(k, k): float(v) for k, v in saved.items()}
    return annotations["glm_preference"].to_numpy(), weights, float(out["length_controlled_winrate"])


def length_controlled_win_rate(preferences: Sequence[float], model_outputs: Sequence[str],
                               baseline_outputs: Sequence[str], *, alpaca_index: Sequence[int] | None = None,
                               glm: str = "auto", n_bootstrap: int = 100, seed: int = 0) -> LCResult:
    """AlpacaEval's length-controlled win rate of the model against the baseline (see the module docstring).

    preferences: one per instruction in [1, 2] (2: the model wins; 0 a draw; NaN: not judged, left
    out of the fit, as alpaca_eval does). alpaca_index: each instruction's position among
    AlpacaEval's 805, or None when they are not AlpacaEval's (then only the minimal GLM applies).
    """
    if glm not in GLMS:
        raise ValueError(f"glm must be one of {', '.join(GLMS)}; got {glm!r}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be at least 0 (0: no bootstrap); got {n_bootstrap!r}")
    preference = np.asarray(preferences, dtype=float)
    len_2 = np.array([len(o) for o in model_outputs], dtype=float)
    len_1 = np.array([len(o) for o in baseline_outputs], dtype=float)
    if not len(preference) == len(len_1) == len(len_2):
        raise ValueError("preferences, model_outputs and baseline_outputs must have the same length")

    gamed, reason = None, ""
    if glm != "length_controlled_minimal":
        if alpaca_index is None:
            reason = "the instructions are not all AlpacaEval's, so no instruction difficulty applies"
        else:
            gamed, reason = load_gamed()
        if gamed is None and glm == "length_controlled_v1":
            raise RuntimeError(f"glm='length_controlled_v1' cannot be fitted: {reason}. Use glm='auto' or "
                               f"'length_controlled_minimal' to fit alpaca_eval's minimal GLM instead")
    name = "length_controlled_v1" if gamed is not None else "length_controlled_minimal"
    index = None if gamed is None else np.asarray(alpaca_index, dtype=int)

    n_judged = int(np.isfinite(preference).sum())
    if n_judged < MIN_JUDGED:
        warnings.warn(f"length-controlled win rate: {n_judged} judged instruction(s); alpaca_eval's {MIN_JUDGED}-fold "
                      f"cross-validation needs at least {MIN_JUDGED}, so LC is left undefined (NaN)", stacklevel=2)
        return LCResult(math.nan, math.nan, math.nan, name, {}, reason)

    from sklearn.exceptions import ConvergenceWarning

    with glm_module() as g, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)   # counted below, and said once
        # v1: alpaca_eval's function itself; minimal: its formula and fitter on the mirrored
        # featurisation, as are the bootstrap refits (the tests check the mirror against the function)
        if name == "length_controlled_v1":
            pred, weights, lc = _official_v1(g, preference, baseline_outputs, model_outputs, index)
        else:
            pred, weights = _fit(g, _features(preference, len_1, len_2, index, gamed), name, gamed)
            lc = float(pred.mean() * 100)
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_bootstrap):
            i = rng.integers(0, len(preference), len(preference))
            if np.isfinite(preference[i]).sum() < MIN_JUDGED:
                continue
            b_pred, _ = _fit(g, _features(preference[i], len_1[i], len_2[i], None if index is None else index[i],
                                          gamed), name, gamed)
            boot.append(b_pred.mean() * 100)
        win_rate = float(np.nanmean(np.where(preference == 0, 1.5, preference) - 1) * 100)
        extreme = bool(g.get_is_extreme_changes(win_rate, lc))
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:   # anything else is passed on as it was
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unconverged:
        warnings.warn(f"length-controlled win rate: liblinear stopped before converging in {unconverged} of the "
                      f"solves behind alpaca_eval's {1 + len(boot)} cross-validated fit(s) (the fit and its bootstrap "
                      f"refits, each over 10 values of C x 5 folds); usual with few instructions, where a large C "
                      f"overfits", stacklevel=2)
    if extreme:
        warnings.warn(f"length-controlled win rate {lc:.1f}% is very different from the raw one, {win_rate:.1f}% "
                      f"(alpaca_eval's check): this might be a sign of failure of the GLM", stacklevel=2)
    if reason and glm == "auto" and reason not in _WARNED:   # once per reason and process: every model shares it
        _WARNED.add(reason)
        warnings.warn(f"length-controlled win rate: {reason}; fitted alpaca_eval's length_controlled_minimal GLM "
                      f"(length and model terms), not AlpacaEval 2.0's length_controlled_v1", stacklevel=2)
    return LCResult(lc_win_rate=lc, lc_standard_error=float(pd.Series(pred).sem() * 100),
                    lc_bootstrap_se=float(np.std(boot, ddof=1)) if len(boot) > 1 else math.nan,
                    glm=name, weights=weights, reason=reason)
