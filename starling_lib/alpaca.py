"""AlpacaEval (Dubois et al., 2024, arXiv:2404.04475): pairwise win rates against reference outputs.

The 805 AlpacaEval instructions with reference outputs are bundled (bundled/alpaca_eval/): GPT-4
Turbo's (`gpt4_1106_preview`, the AlpacaEval 2.0 baseline), text-davinci-003's (the 1.0 baseline)
and Starling-LM-7B-alpha's, plus the AlpacaEval 2.0 leaderboard.

  * `judge_prompt`: the `weighted_alpaca_eval_gpt4_turbo` annotator's prompt (alpaca_eval_clf.txt,
    transcribed): the instruction and two outputs labelled "m" (output_1) and "M" (output_2); the
    judge answers with one identifier.
  * Preference p in [1, 2] (2: output_2 wins), as AlpacaEval encodes it. The weighted annotator
    reads it off the judge's next-token probabilities, p = 2 - P(m) / (P(m) + P(M)); `LocalPairwiseJudge`
    does exactly that with a local model. `ApiPairwiseJudge` reads the judge's one-token reply
    (p = 1 or 2; a reply that is neither identifier has no preference, NaN).
  * Failed and unparsable replies are told apart: `annotate` gives every row a `status`, "ok",
    "unparsable" (the judge answered, but with neither identifier: the reply was paid for, so it is
    cached with its text and not asked again) or "failed" (the request failed for good: not cached,
    so a rerun asks again), warns with both counts, and `summarize` reports them (n_unparsable,
    n_failed) beside n_total, the preferences the win rate counts.
  * `annotate`: the evaluated model is output_2 and the baseline output_1, with the two swapped on a
    seeded random half of the instructions (AlpacaEval randomises the order to cancel position
    bias) and the preference flipped back (p -> 3 - p).
  * `win_rate`: mean(p - 1) x 100, with AlpacaEval's counts, standard error and discrete win rate.
  * `summarize`: the win rate and AlpacaEval's length-controlled win rate, fitted by the alpaca_eval
    package's own GLM (starling_lib/length_control.py: length_controlled_v1 when its hub file is
    at hand, otherwise its length_controlled_minimal, named as such), with alpaca_eval's LC
    standard error and a bootstrap one.

Departures:
  * `max_chars` may truncate the outputs shown to a local judge with a short context (the lengths
    in the GLM are always the full outputs' lengths); AlpacaEval never truncates.
  * `win_rate` is computed here (a mean and its standard error); tests/test_alpaca.py checks it
    against alpaca_eval's `get_winrate`, which is not called at run time because importing
    alpaca_eval takes 1.5 s and its win rate logs at INFO on the root logger.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit

from starling_lib import chat
from starling_lib.data import bundled_path
from starling_lib.jsonl_cache import JsonlCache, content_hash
from starling_lib.length_control import GLMS, length_controlled_win_rate
from starling_lib.llm_client import ChatClient, ClientConfig, RequestError
from starling_lib.mtbench import LocalJudge, render_judge_prompt, start_reply

BUNDLED_OUTPUTS = {
    "gpt4_1106_preview": "gpt4_1106_preview_model_outputs.json",  # AlpacaEval 2.0 reference
    "text_davinci_003": "text_davinci_003_model_outputs.json",    # AlpacaEval 1.0 reference
    "Starling-LM-7B-alpha": "Starling-LM-7B-alpha_model_outputs.json",
}
LEADERBOARD = "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
# Starling-LM-7B-alpha's AlpacaEval 1.0 figure from its model card (win rate vs text-davinci-003,
# GPT-4 judge); the AE2 figures are in the bundled leaderboard.
STARLING_AE1_WIN_RATE = 91.99

SYSTEM_PROMPT = ("You are a highly efficient assistant, who evaluates and selects the best large language model "
                 "(LLMs) based on the quality of their responses to a given instruction. This process will be "
                 "used to create a leaderboard reflecting the most accurate and human-preferred answers.")
USER_PROMPT = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{instruction}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "m",
        "output": """{output_1}"""
    }},
    {{
        "model_identifier": "M",
        "output": """{output_2}"""
    }}
}}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier'''


def load_outputs(name: str, limit: int = 0) -> pd.DataFrame:
    """A model's AlpacaEval outputs, one row per instruction: dataset, instruction, output, generator.

    name: a key of BUNDLED_OUTPUTS, or a path to a JSON list in the same format.
    limit: keep the first `limit` instructions (0: all 805).
    """
    path = bundled_path("alpaca_eval", BUNDLED_OUTPUTS[name]) if name in BUNDLED_OUTPUTS else Path(name)
    df = pd.DataFrame(json.loads(Path(path).read_text(encoding="utf-8")))
    return df.head(limit) if limit else df


def load_leaderboard() -> pd.DataFrame:
    """The bundled AlpacaEval 2.0 leaderboard (judge: weighted GPT-4 Turbo; baseline gpt4_1106_preview)."""
    df = pd.read_csv(bundled_path("alpaca_eval", LEADERBOARD), index_col=0)
    df.index.name = "model"
    return df


def published_rows(models: Sequence[str] = ("Starling-LM-7B-alpha",)) -> pd.DataFrame:
    """The leaderboard's rows for `models`: win rate, LC win rate, their standard errors, length."""
    cols = ["win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "n_total", "avg_length"]
    return load_leaderboard().loc[list(models), cols]


def generate_outputs(model, tokenizer, instructions: Sequence[str], generator: str,
                     config: chat.DecodingConfig = chat.DecodingConfig(max_new_tokens=1024),
                     progress: bool = True) -> list[dict]:
    """A model's outputs to `instructions` in the bundled format (instruction, output, generator).

    Each instruction is one user turn in the model's chat template; greedy unless `config` samples.
    """
    replies = chat.chat_batch(model, tokenizer, [[{"role": "user", "content": x}] for x in instructions],
                              config=config, progress=progress)
    return [{"instruction": x, "output": r, "generator": generator} for x, r in zip(instructions, replies)]


def outputs_for_models(specs: Mapping[str, str], instructions: Sequence[str], *, device: str | None = None,
                       config: chat.DecodingConfig = chat.DecodingConfig(max_new_tokens=1024),
                       progress: bool = True) -> dict[str, list[str]]:
    """{label: outputs} for each model of `specs` ({label: hub id or path}), loaded one at a time."""
    from starling_lib.models import load_model_and_tokenizer
    out = {}
    for label, name in specs.items():
        model, tokenizer = load_model_and_tokenizer(name, device=device or None)
        out[label] = [o["output"] for o in generate_outputs(model, tokenizer, instructions, label, config, progress)]
        del model, tokenizer
    return out


def judge_prompt(instruction: str, output_1: str, output_2: str, max_chars: int = 0) -> tuple[str, str]:
    """(system, user) asking which of output_1 ("m") and output_2 ("M") is better.

    max_chars > 0 cuts each output to that many characters (see the module docstring).
    """
    if max_chars:
        output_1, output_2 = output_1[:max_chars], output_2[:max_chars]
    return SYSTEM_PROMPT, USER_PROMPT.format(instruction=instruction, output_1=output_1, output_2=output_2)


# ----------------------------------------------------------------------------------------------
# Judges: preference in [1, 2], 2 meaning output_2 ("M") is better

class LocalPairwiseJudge:
    """A local causal LM's preference from its next-token probabilities of "m" and "M"."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer = model, tokenizer
        self.id = f"local:{name}:likelihood"

    def prefer(self, system: str, user: str) -> float:
        prompt = start_reply(render_judge_prompt(self.tokenizer, system, user))
        logp_m, logp_M = chat.continuation_logprobs(self.model, self.tokenizer, prompt, ["m", "M"]).tolist()
        return float(2 - expit(logp_m - logp_M))  # P(m) / (P(m) + P(M)) = sigmoid(logp_m - logp_M)


def parse_identifier(text: str) -> float:
    """The preference a judge's reply names: its first character "m" is 1.0, "M" 2.0, anything
    else (an unparsable reply) NaN."""
    return {"m": 1.0, "M": 2.0}.get(text.strip()[:1], float("nan"))


class ApiPairwiseJudge:
    """An OpenAI-compatible judge (AlpacaEval 2.0's is gpt-4-1106-preview) answering with one token.

    Reads the reply's first character ("m": 1, "M": 2, else NaN, see `parse_identifier`): the
    discrete preference of AlpacaEval's non-weighted annotators. The weighted annotator's logprobs
    are not used, because the shared client (llm_client.ChatClient) returns only the reply text.
    A request that fails for good raises llm_client.RequestError (it is not an unparsable reply).
    `client`: by default one from the environment, as mtbench.ApiJudge's, at temperature 0 with 1
    output token.
    """

    def __init__(self, model: str | None = None, client: ChatClient | None = None):
        if client is None:
            client = ChatClient(ClientConfig.from_env(model, temperature=0.0, max_tokens=1))
        self.client = client
        self.id = f"api:{client.config.model}"

    def judge_reply(self, system: str, user: str) -> tuple[float, str]:
        """(preference, the judge's reply text); RequestError when the request fails."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.client.complete_messages(messages).text
        return parse_identifier(text), text

    def prefer(self, system: str, user: str) -> float:
        """The preference (NaN for an unparsable reply); RequestError when the request fails."""
        return self.judge_reply(system, user)[0]


def _ask(judge, system: str, user: str) -> tuple[float, str | None]:
    """(shown preference, reply text or None) from any judge: with its reply where it has one."""
    if hasattr(judge, "judge_reply"):
        return judge.judge_reply(system, user)
    return float(judge.prefer(system, user)), None


def annotate(instructions: Sequence[str], model_outputs: Sequence[str], baseline_outputs: Sequence[str], judge,
             *, model_name: str, cache_path: str | os.PathLike | None = None, seed: int = 0, max_chars: int = 0,
             progress: bool = True) -> pd.DataFrame:
    """One row per instruction: index, instruction, output_1 (baseline), output_2 (model), swapped,
    preference (in [1, 2], 2: the model wins; NaN: no preference), status ("ok", "unparsable":
    the judge named neither output, "failed": the request failed) and error (what went wrong).

    On a seeded random half of the instructions the model's output is shown first and the judge's
    preference flipped back. Preferences, and unparsable replies with their text, are cached by
    (model, index, judge) with a hash of the prompt, so a rerun only asks for what is missing,
    changed or failed. A warning gives the counts of failed and unparsable rows.
    """
    from tqdm.auto import tqdm

    if not len(instructions) == len(model_outputs) == len(baseline_outputs):
        raise ValueError("instructions, model_outputs and baseline_outputs must have the same length")
    cache = JsonlCache(cache_path, ("model", "index", "judge")) if cache_path else None
    swapped = np.random.default_rng(seed).random(len(instructions)) < 0.5
    rows = []
    for i in tqdm(range(len(instructions)), desc=f"AlpacaEval {model_name}", disable=not progress):
        first, second = (model_outputs[i], baseline_outputs[i]) if swapped[i] else (baseline_outputs[i], model_outputs[i])
        system, user = judge_prompt(instructions[i], first, second, max_chars)
        sha = content_hash(system, user)
        hit = cache.get(model_name, i, judge.id) if cache is not None else None
        error = None
        if hit is not None and hit["prompt_sha"] == sha:
            shown = float("nan") if hit["shown_preference"] is None else hit["shown_preference"]
            status = hit.get("status", "ok")
            reply = hit.get("reply")
        else:
            try:
                shown, reply = _ask(judge, system, user)
            except RequestError as e:   # failed for good: not cached, a rerun asks again
                shown, reply, status, error = float("nan"), None, "failed", str(e)
            else:
                status = "unparsable" if np.isnan(shown) else "ok"
                if cache is not None:
                    record = {"model": model_name, "index": i, "judge": judge.id, "prompt_sha": sha,
                              "shown_preference": None if status == "unparsable" else shown, "status": status}
                    if status == "unparsable":
                        record["reply"] = reply
                    cache.put(record)
        if status == "unparsable":
            error = f"the judge named neither output: {reply!r:.80}" if reply is not None else "no preference"
        rows.append({"index": i, "instruction": instructions[i], "output_1": baseline_outputs[i],
                     "output_2": model_outputs[i], "swapped": bool(swapped[i]),
                     "preference": 3 - shown if swapped[i] else shown, "status": status, "error": error})
    out = pd.DataFrame(rows)
    n_failed, n_unparsable = int((out["status"] == "failed").sum()), int((out["status"] == "unparsable").sum())
    if n_failed or n_unparsable:
        replies = "reply" if n_unparsable == 1 else "replies"
        warnings.warn(f"AlpacaEval {model_name}: of {len(out)} instructions, {n_failed} failed request(s) (not "
                      f"cached: a rerun asks again) and {n_unparsable} unparsable {replies} naming neither "
                      f"output (cached); both are left out of the win rate", stacklevel=2)
    return out


# ----------------------------------------------------------------------------------------------
# Win rates

def win_rate(preferences: Sequence[float]) -> dict:
    """AlpacaEval's head-to-head summary of preferences in [1, 2] (0 counts as a draw, 1.5; NaN dropped).

    win_rate = mean(p - 1) x 100 and its standard error; n_wins / n_wins_base / n_draws count
    p > 1.5, p < 1.5 and p = 1.5; discrete_win_rate counts a win as 1 and a draw as 1/2.
    """
    p = pd.Series(preferences, dtype=float).replace({0.0: 1.5}).dropna()
    if ((p < 1) | (p > 2)).any():
        raise ValueError("preferences must lie in [1, 2] (or be 0 for a draw)")
    x = p - 1
    wins, losses, draws = int((x > 0.5).sum()), int((x < 0.5).sum()), int((x == 0.5).sum())
    n = len(x)
    return {"win_rate": float(x.mean() * 100) if n else float("nan"),
            "standard_error": float(x.sem() * 100) if n > 1 else float("nan"),
            "n_wins": wins, "n_wins_base": losses, "n_draws": draws, "n_total": n,
            "discrete_win_rate": (wins + draws / 2) / n * 100 if n else float("nan")}


@functools.lru_cache(maxsize=1)
def _alpaca_positions() -> dict[str, int]:
    """instruction -> its position among AlpacaEval's 805, read once (every summarized model asks)."""
    return {x: i for i, x in enumerate(load_outputs("gpt4_1106_preview")["instruction"])}


def alpaca_indices(instructions: Sequence[str]) -> list[int] | None:
    """Each instruction's position among AlpacaEval's 805 (the order of the bundled outputs and of
    alpaca_eval's data set), or None when any instruction is not one of them."""
    position = _alpaca_positions()
    found = [position.get(x) for x in instructions]
    return None if any(i is None for i in found) else found


def summarize(annotations: pd.DataFrame, *, lc_glm: str = "auto", lc_bootstrap: int = 100, seed: int = 0) -> dict:
    """Win rate, discrete win rate, LC win rate and counts of an `annotate` table: n_total rows
    with a preference, n_failed (requests that failed) and n_unparsable (replies that named
    neither output; without a `status` column, every row with no preference).

    The LC fit (starling_lib.length_control, `lc_glm` and `lc_bootstrap` resamples) gives
    length_controlled_winrate, lc_standard_error (alpaca_eval's), lc_bootstrap_se, glm (the GLM
    fitted) and length_weight (the length term's coefficient per unit of tanh(model minus baseline
    length / its std): > 0 when the judge favours the longer output; alpaca_eval's own sign is the
    opposite, its difference being baseline minus model).
    """
    out = win_rate(annotations["preference"])
    if "status" in annotations:
        out.update(n_failed=int((annotations["status"] == "failed").sum()),
                   n_unparsable=int((annotations["status"] == "unparsable").sum()))
    else:
        out.update(n_failed=0, n_unparsable=int(annotations["preference"].isna().sum()))
    index = alpaca_indices(annotations["instruction"]) if "instruction" in annotations else None
    fit = length_controlled_win_rate(annotations["preference"], annotations["output_2"], annotations["output_1"],
                                     alpaca_index=index, glm=lc_glm, n_bootstrap=lc_bootstrap, seed=seed)
    out.update(length_controlled_winrate=fit.lc_win_rate, lc_standard_error=fit.lc_standard_error,
               lc_bootstrap_se=fit.lc_bootstrap_se, glm=fit.glm, length_weight=0.0 - fit.weights.get("length", np.nan),
               avg_length=float(annotations["output_2"].str.len().mean()))
    return out


def evaluate_outputs(outputs: Mapping[str, Sequence[str]], instructions: Sequence[str],
                     baseline_outputs: Sequence[str], judge, *, cache_path: str | os.PathLike | None = None,
                     seed: int = 0, max_chars: int = 0, progress: bool = True, lc_glm: str = "auto",
                     lc_bootstrap: int = 100) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Annotate and summarize several models' outputs against one baseline: (annotations, summary).

    annotations: every `annotate` row with a `model` column; summary: one `summarize` row per model
    (`lc_glm`, `lc_bootstrap`: its LC fit). The LC settings are checked before anything is judged.
    """
    if lc_glm not in GLMS:
        raise ValueError(f"lc_glm must be one of {', '.join(GLMS)}; got {lc_glm!r}")
    if lc_bootstrap < 0:
        raise ValueError(f"lc_bootstrap must be at least 0 (0: no bootstrap standard error); got {lc_bootstrap!r}")
    frames, rows = [], []
    for name, model_outputs in outputs.items():
        ann = annotate(instructions, model_outputs, baseline_outputs, judge, model_name=name, cache_path=cache_path,
                       seed=seed, max_chars=max_chars, progress=progress)
        frames.append(ann.assign(model=name))
        rows.append({"model": name, "judge": judge.id,
                     **summarize(ann, lc_glm=lc_glm, lc_bootstrap=lc_bootstrap, seed=seed)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(rows).set_index("model")


def summary_metrics(summary: pd.DataFrame, prefix: str = "eval/alpaca_eval") -> dict:
    """Flat metrics `{prefix}/{model}/win_rate`, `.../lc_win_rate`, ... of an `evaluate_outputs` summary."""
    names = {"win_rate": "win_rate", "standard_error": "win_rate_se", "discrete_win_rate": "discrete_win_rate",
             "length_controlled_winrate": "lc_win_rate", "lc_standard_error": "lc_win_rate_se",
             "lc_bootstrap_se": "lc_win_rate_bootstrap_se",
             "n_total": "n_judged", "n_failed": "n_failed", "n_unparsable": "n_unparsable",
             "glm": "lc_glm", "length_weight": "lc_length_weight", "judge": "judge"}
    out = {}
    for model, row in summary.iterrows():
        for old, new in names.items():
            value = row[old]
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                value = int(value)
            elif isinstance(value, (float, np.floating)):
                value = None if np.isnan(value) else round(float(value), 4)
            out[f"{prefix}/{model}/{new}"] = value
    return out


def eval_metrics(summary: pd.DataFrame, baseline: str, instructions: Sequence[str]) -> dict:
    """Notebook 05's AlpacaEval metrics: `summary_metrics`, the baseline's name and the number of
    instructions judged."""
    return {**summary_metrics(summary), "eval/alpaca_eval/baseline": baseline,
            "eval/alpaca_eval/num_instructions": len(instructions)}


def comparison_table(summary: pd.DataFrame, published: Sequence[str] = ("Starling-LM-7B-alpha",)) -> pd.DataFrame:
    """Long table model, metric ("win rate" / "LC win rate"), value, source: this run and the leaderboard.

    Published rows are named "<model> (published)", so a model judged here and on the leaderboard
    appears twice, once per source.
    """
    source = "this run, judge " + summary["judge"]
    if "glm" in summary:   # the published LC is length_controlled_v1's; say when this run's is not
        source = source + ", LC by alpaca_eval's " + summary["glm"]
    ours = summary[["win_rate", "length_controlled_winrate"]].assign(source=source)
    theirs = published_rows(published)[["win_rate", "length_controlled_winrate"]].assign(
        source="published: AlpacaEval 2.0 leaderboard")
    theirs.index = [f"{m} (published)" for m in theirs.index]
    both = pd.concat([ours, theirs]).rename_axis("model").reset_index()
    both = both.rename(columns={"win_rate": "win rate", "length_controlled_winrate": "LC win rate"})
    return both.melt(id_vars=["model", "source"], var_name="metric", value_name="value")


def pairwise_judge_for(mt_judge):
    """The AlpacaEval judge matching an MT-Bench judge: the same local model (likelihood of m / M),
    or the same API model asked for a one-token answer."""
    if isinstance(mt_judge, LocalJudge):
        return LocalPairwiseJudge(mt_judge.model, mt_judge.tokenizer, mt_judge.name)
    return ApiPairwiseJudge(model=mt_judge.client.config.model)
