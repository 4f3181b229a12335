"""MMLU (Hendrycks et al., 2021, arXiv:2009.03300) through EleutherAI's lm-evaluation-harness.

The Starling-LM-7B-alpha card's table has an MMLU column (Starling-7B 63.9, Openchat-3.5 64.3);
`published_table` lists those and the Open LLM Leaderboard's figures, each with where it comes
from. This module runs the benchmark with the harness the field uses, `lm_eval.simple_evaluate`,
on a causal LM loaded by `models.load_model_and_tokenizer` (a hub id, a folder such as one of
notebook 04's saved policies, "tiny" or "smollm2-135m") and wrapped in lm-eval's `HFLM`:

  * task "mmlu": lm-eval's own `mmlu` group, 57 subjects of the hub data set `cais/mmlu`, test
    split, the prompt `<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:` after the subject's
    description, `num_fewshot` examples from the subject's dev split (the first ones, lm-eval's
    `first_n` sampler; 5 is MMLU's protocol). Each question is scored by loglikelihood: the
    model's log-probability of " A", " B", " C" and " D" after the prompt; the prediction is the
    argmax and the metric lm-eval's `acc` (not `acc_norm`: the four continuations are one token
    each, so length normalisation would change nothing). Overall accuracy is the mean over all
    questions (lm-eval's group aggregate weighted by subject size), with lm-eval's standard error.
  * task "local": the same template on 20 easy questions in MMLU's format written for this
    project (bundled/mmlu_local/, PROVENANCE.md), 4 subjects of 5 with 5 dev questions each,
    defined in the harness's own task format and loaded through `TaskManager(include_path=...)`,
    so that the whole path runs offline and in seconds. Its numbers say that the integration works
    and how a model does on trivial questions; they are not MMLU scores.

Offline, "mmlu" cannot download `cais/mmlu`: `check_available` says so in one line (`HubError`) and
how to fill the cache first (`python -m starling_lib.mmlu --precache`, which loads every subject
the way lm-eval does). A run that also has `HF_HUB_OFFLINE=1` then reads the cache.

Departures and choices:
  * No chat template by default (`apply_chat_template=False`): the prompt is plain text, as the
    Open LLM Leaderboard ran it. The Starling card does not say how its MMLU was run; the
    Openchat-3.5 card's 64.3 was measured "in chat mode" (its conversation template applied), 5-shot
    with Chain-of-Thought-Hub prompts, the answer parsed from generated text (imoneoi/openchat,
    ochat/evaluation: eval_data/fs_cothub/mmlu, match_answer.py), which is neither this prompt nor
    loglikelihood scoring. `apply_chat_template=True` renders lm-eval's prompt through the model's
    chat template (few-shot examples as earlier turns, lm-eval's `fewshot_as_multiturn`), still
    scored by loglikelihood.
  * The model is loaded by this project's loader and handed to `HFLM` (lm-eval's "hf" model
    class) already built, rather than `model_args="pretrained=..."`: the same weights, dtype,
    device, hub revision (`org/name@rev`) and tokenizer set-up as every other stage.
  * `limit` is lm-eval's: questions per subject (57 x limit for "mmlu"), for a quick look; a
    limited run is not MMLU.
  * The bundled task reads its JSONL files through `custom_dataset` (data.py beside the YAML),
    not `dataset_path: json` with `data_files`, because lm-eval would resolve a relative data file
    against the working directory, not the task's folder.
  * Beside lm-eval's standard error, `results_table` gives a Wilson 95% interval of the accuracy
    (`stats.wilson_interval`: better than +-1.96 se at 20 questions) and whether it lies above
    chance (25%).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from starling_lib import stats
from starling_lib.data import bundled_path
from starling_lib.hub import HubError

# Notebook parameter -> lm-eval task (a group of subject tasks).
TASKS = {"local": "mmlu_local", "mmlu": "mmlu"}
MMLU_DATASET = "cais/mmlu"          # what lm-eval's mmlu task reads (lm_eval/tasks/mmlu/default)
CHANCE = 0.25                       # four choices
LOCAL_TASK_DIR = "mmlu_local"       # under starling_lib/bundled/
PRECACHE_COMMAND = "python -m starling_lib.mmlu --precache"
LM_EVAL_INSTALL = "pip install -e '.[mmlu]'"

# MMLU figures published for the models this project reproduces: (model, mmlu in %, protocol, source).
# The model card's two come from its evaluation table, also in mtbench.PUBLISHED (its "mmlu" column).
LEADERBOARD = [
    ("Starling-LM-7B-alpha", 64.67,
     "Open LLM Leaderboard (v1): lm-eval, 5-shot, acc, no chat template",
     "model-index proposed by leaderboard-pr-bot in the card's PR #31 (huggingface.co/berkeley-nest/"
     "Starling-LM-7B-alpha, refs/pr/31, commit 28e85aa)"),
    ("Starling-LM-7B-beta", 65.14,
     "Open LLM Leaderboard (v1): lm-eval, 5-shot, acc, no chat template",
     "model-index proposed in the card's PR #6 (huggingface.co/Nexusflow/Starling-LM-7B-beta, refs/pr/6, "
     "commit 9e38ec7); the card itself reports only MT-Bench (8.12)"),
]
CARD_PROTOCOL = {
    "Starling-7B": "not stated on the card",
    "Openchat-3.5": "5-shot, chat mode, Chain-of-Thought-Hub prompts, answer parsed from generated text "
                    "(Openchat-3.5's card and imoneoi/openchat ochat/evaluation)",
}
CARD_SOURCE = "Starling-LM-7B-alpha model card, evaluation table (huggingface.co/berkeley-nest/Starling-LM-7B-alpha)"

# lm-eval's messages that every run here triggers on purpose (an already-built model, the bundled
# task's custom_dataset, num_fewshot set by the caller): filtered out while `evaluate` runs.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                      "Passed an already-initialized model through `pretrained`",
                      "Custom kwargs can be passed to `--metadata`",
                      "Overwriting default num_fewshot")


def published_table() -> pd.DataFrame:
    """model, mmlu (%), protocol, source: the Starling card's MMLU column for Starling-7B and
    Openchat-3.5, then the Open LLM Leaderboard's figures for Starling-LM-7B-alpha and -beta."""
    from starling_lib.mtbench import published_table as card

    rows = card().set_index("model").loc[list(CARD_PROTOCOL), "mmlu"]
    out = [(m, float(v), CARD_PROTOCOL[m], CARD_SOURCE) for m, v in rows.items()] + LEADERBOARD
    return pd.DataFrame(out, columns=["model", "mmlu", "protocol", "source"])


# ----------------------------------------------------------------------------------------------
# Tasks


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(f"MMLU runs through lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL} "
                          "(make installs it with the dev extra)") from e


@functools.lru_cache(maxsize=None)
def task_manager(task: str = "local"):
    """lm-eval's TaskManager for `task` ("local" or "mmlu"): the bundled task's folder only, or
    lm-eval's own tasks (indexing those takes several seconds, hence the cache)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if task == "local":
        return TaskManager(include_path=str(bundled_path(LOCAL_TASK_DIR)), include_defaults=False)
    if task == "mmlu":
        return TaskManager()
    raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}; got {task!r}")


def _offline_error(cause: BaseException) -> HubError:
    import datasets

    return HubError(
        f"MMLU needs the Hugging Face hub: lm-eval's mmlu task reads the data set {MMLU_DATASET} (57 subjects), "
        f"which could not be had ({type(cause).__name__}: {cause}) and is not in the datasets cache "
        f"({datasets.config.HF_DATASETS_CACHE}); fill the cache where the hub is reachable with `{PRECACHE_COMMAND}` "
        f"(then HF_HUB_OFFLINE=1 reads it), or use the bundled task (\"local\")")


def check_available(task: str) -> None:
    """Raise HubError (one line: what is missing and how to pre-cache it) when `task` is "mmlu" and
    `cais/mmlu` can be neither downloaded nor read from the datasets cache. Checked on one subject,
    as lm-eval would read it, before any model is loaded; "local" is always available."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}; got {task!r}")
    _require_lm_eval()
    if task != "mmlu":
        return
    import datasets

    try:
        datasets.load_dataset(MMLU_DATASET, "abstract_algebra", split="dev")
    except (ConnectionError, OSError) as e:   # offline: ConnectionError; a missing repository: FileNotFoundError
        raise _offline_error(e) from e


def precache() -> None:
    """Load every MMLU subject through lm-eval's task manager, as a run does, so that the datasets
    cache holds them for later offline runs (`HF_HUB_OFFLINE=1`)."""
    loaded = task_manager("mmlu").load([TASKS["mmlu"]])
    print(f"{len(loaded['tasks'])} MMLU subject tasks of {MMLU_DATASET} are in the datasets cache")


# ----------------------------------------------------------------------------------------------
# One model


@dataclass
class MmluRun:
    """One model's result: the group's accuracy and lm-eval's standard error, per subject and per question."""

    model: str
    task: str                      # "local" or "mmlu"
    acc: float
    acc_stderr: float
    n: int                         # questions scored
    num_fewshot: int
    limit: int                     # questions per subject (0: all)
    chat_template: bool
    seconds: float                 # the lm-eval run, the model already loaded
    subjects: pd.DataFrame = field(repr=False)   # subject, category, acc, acc_stderr, n
    samples: pd.DataFrame = field(repr=False)    # one row per question (see `_samples`)
    lm_eval_version: str = ""

    @property
    def n_correct(self) -> int:
        return int(self.samples["correct"].sum())


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _EXPECTED_WARNINGS)


def _leaves(group_subtasks: Mapping[str, Sequence[str]], root: str) -> dict[str, str]:
    """{subject task: the group just above it} under `root` (lm-eval's mmlu has categories in between)."""
    out = {}
    for child in group_subtasks.get(root, []):
        if child in group_subtasks:
            out.update(_leaves(group_subtasks, child))
        else:
            out[child] = root
    return out


def _stderr(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")   # lm-eval writes "N/A" when it has none


def _samples(label: str, out: dict, leaves: Mapping[str, str]) -> pd.DataFrame:
    """Per question: model, subject, doc_id, question, choices, prompt (what the model read before " A" ...
    " D"), target (index of the right choice), pred (argmax of the choices' loglikelihoods, as
    lm-eval's acc), correct (lm-eval's acc), loglikelihoods (lm-eval's, one per choice)."""
    rows = []
    for task in leaves:
        alias = out["results"][task].get("alias", task)
        for s in out["samples"].get(task, []):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            rows.append({"model": label, "subject": alias, "doc_id": int(s["doc_id"]),
                         "question": s["doc"].get("question", ""), "choices": list(s["doc"].get("choices", [])),
                         "prompt": s["arguments"][0][0],
                         "target": int(s["target"]),
                         "pred": int(np.argmax(lls)), "correct": bool(s["acc"]), "loglikelihoods": lls})
    return pd.DataFrame(rows)


def evaluate(model, tokenizer, label: str, task: str = "local", *, num_fewshot: int = 5, limit: int = 0,
             apply_chat_template: bool = False, batch_size: int = 8, bootstrap_iters: int = 1000) -> MmluRun:
    """`num_fewshot`-shot MMLU (task "mmlu") or the bundled 20-question task ("local") on an
    already-loaded causal LM through `lm_eval.simple_evaluate` with lm-eval's HFLM.

    limit: questions per subject (0: all). apply_chat_template: render the prompts with the
    tokenizer's chat template (see the module docstring). bootstrap_iters: passed to lm-eval, which
    computes the standard error of an accuracy in closed form (sd / sqrt(n)) whenever it is > 0.
    The global random generators are left alone (lm-eval would reseed them; nothing here samples:
    the few-shot examples are the first ones of each subject's dev split).
    """
    manager = task_manager(task)   # an unknown task, or no lm-eval, fails here
    group = TASKS[task]
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    quiet = _DropExpected()
    # A logger's filters see only the records logged on it, not its children's: filter every lm_eval logger.
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("lm_eval")]
    for logger in loggers:
        logger.addFilter(quiet)
    start = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=[group], num_fewshot=num_fewshot, limit=limit or None, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=True, apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template, random_seed=None, numpy_random_seed=None,
            torch_random_seed=None)
    except ConnectionError as e:
        raise _offline_error(e) from e
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
    seconds = time.perf_counter() - start
    leaves = _leaves(out["group_subtasks"], group)
    res = out["results"]
    subjects = pd.DataFrame([{"subject": res[t].get("alias", t), "category": res[parent].get("alias", parent).strip(" -"),
                              "acc": float(res[t]["acc,none"]), "acc_stderr": _stderr(res[t].get("acc_stderr,none")),
                              "n": int(out["n-samples"][t]["effective"])} for t, parent in leaves.items()])
    return MmluRun(model=label, task=task, acc=float(res[group]["acc,none"]),
                   acc_stderr=_stderr(res[group].get("acc_stderr,none")), n=int(subjects["n"].sum()),
                   num_fewshot=num_fewshot, limit=limit, chat_template=bool(apply_chat_template), seconds=seconds,
                   subjects=subjects, samples=_samples(label, out, leaves),
                   lm_eval_version=str(out.get("lm_eval_version", "")))


def evaluate_models(specs: Mapping[str, str], task: str = "local", *, num_fewshot: int = 5, limit: int = 0,
                    apply_chat_template: bool = False, batch_size: int = 8,
                    device: str | None = None) -> list[MmluRun]:
    """`evaluate` each model of `specs` ({label: hub id or path}), loaded one at a time and freed
    before the next. For "mmlu" the data set is checked first, before any model is loaded."""
    import gc

    import torch

    from starling_lib.models import load_model_and_tokenizer

    check_available(task)
    runs = []
    for label, name in specs.items():
        model, tokenizer = load_model_and_tokenizer(name, device=device or None)
        runs.append(evaluate(model, tokenizer, label, task, num_fewshot=num_fewshot, limit=limit,
                             apply_chat_template=apply_chat_template, batch_size=batch_size))
        print(f"{label}: accuracy {runs[-1].acc:.3f} +- {runs[-1].acc_stderr:.3f} on {runs[-1].n} questions "
              f"({runs[-1].seconds:.1f} s)")
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return runs


# ----------------------------------------------------------------------------------------------
# Tables and metrics


RESULT_COLUMNS = ["model", "task", "acc", "acc_stderr", "ci95_low", "ci95_high", "vs_chance", "most_picked",
                  "most_picked_share", "n", "num_fewshot", "chat_template", "seconds"]


def results_table(runs: Sequence[MmluRun]) -> pd.DataFrame:
    """One row per model: task, accuracy, lm-eval's standard error, the Wilson 95% interval of the
    share correct, whether it lies above chance (`stats.verdict` against 25%), the letter it picked
    most and on what share of the questions (a model that has not learnt the format picks one
    letter whatever the question), questions, shots, chat template, seconds. No runs: no rows, the
    same columns."""
    rows = []
    for r in runs:
        low, high = stats.wilson_interval(r.n_correct, r.n)
        picks = r.samples["pred"].value_counts()
        rows.append({"model": r.model, "task": r.task, "acc": r.acc, "acc_stderr": r.acc_stderr,
                     "ci95_low": low, "ci95_high": high, "vs_chance": stats.verdict(low, high, CHANCE),
                     "most_picked": "ABCD"[int(picks.index[0])], "most_picked_share": float(picks.iloc[0] / r.n),
                     "n": r.n, "num_fewshot": r.num_fewshot, "chat_template": r.chat_template,
                     "seconds": r.seconds})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def subject_table(runs: Sequence[MmluRun]) -> pd.DataFrame:
    """Long table model, subject, category, acc, acc_stderr, n (no runs: no rows, the same columns)."""
    columns = ["model", "subject", "category", "acc", "acc_stderr", "n"]
    if not runs:
        return pd.DataFrame(columns=columns)
    return pd.concat([r.subjects.assign(model=r.model) for r in runs], ignore_index=True)[columns]


def question_table(run: MmluRun, index: int = 0) -> pd.DataFrame:
    """One question of a run, a row per choice: the letter, the answer text, lm-eval's loglikelihood
    of " <letter>" after the prompt, its share of the four (softmax over them), and which choice
    is right and which the model picked."""
    row = run.samples.iloc[index]
    lls = np.asarray(row["loglikelihoods"])
    probs = np.exp(lls - lls.max())
    return pd.DataFrame({"choice": list("ABCD")[:len(lls)], "answer": row["choices"], "loglikelihood": lls,
                         "share of the four": probs / probs.sum(),
                         "right": [i == row["target"] for i in range(len(lls))],
                         "picked": [i == row["pred"] for i in range(len(lls))]})


def paired_difference(runs: Sequence[MmluRun], model: str, baseline: str) -> dict[str, float]:
    """`model`'s accuracy minus `baseline`'s on the questions both answered (matched by subject and
    question): `stats.paired_interval` of the per-question differences of correctness."""
    correct = {r.model: r.samples.set_index(["subject", "doc_id"])["correct"].astype(float) for r in runs}
    a, b = correct[model].align(correct[baseline], join="inner")
    return stats.paired_interval(a.tolist(), b.tolist())


def comparable_to_published(run: MmluRun) -> bool:
    """Whether a run may stand beside the published figures: all of MMLU, 5-shot. (Even then the
    card's protocol differs from lm-eval's; the leaderboard's is lm-eval's, without a chat template.)"""
    return run.task == "mmlu" and run.limit == 0 and run.num_fewshot == 5


def comparison_table(runs: Sequence[MmluRun]) -> pd.DataFrame:
    """model, mmlu (%), source: the published figures and this run's where `comparable_to_published`."""
    theirs = published_table().assign(source=lambda d: "published: " + d["protocol"])[["model", "mmlu", "source"]]
    ours = [{"model": r.model, "mmlu": 100 * r.acc,
             "source": f"this run: lm-eval {r.lm_eval_version}, {r.num_fewshot}-shot, acc"
                       + (", chat template" if r.chat_template else "")}
            for r in runs if comparable_to_published(r)]
    return pd.concat([pd.DataFrame(ours, columns=["model", "mmlu", "source"]), theirs], ignore_index=True)


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def eval_metrics(runs: Sequence[MmluRun], task: str, num_fewshot: int, limit: int,
                 apply_chat_template: bool, prefix: str = "eval/mmlu") -> dict:
    """Notebook 05's MMLU metrics: the settings, then per model `{prefix}/{model}` (accuracy),
    `/se` (lm-eval's standard error), `/ci95_low`, `/ci95_high` (Wilson), `/n`, `/seconds`, and
    `{prefix}_by_subject` {model: {subject: accuracy}}. task "" (skipped) records the settings only."""
    import importlib.metadata

    out = {f"{prefix}/task": task, f"{prefix}/lm_eval_task": TASKS.get(task, ""), f"{prefix}/num_fewshot": num_fewshot,
           f"{prefix}/limit": limit, f"{prefix}/chat_template": bool(apply_chat_template), f"{prefix}/metric": "acc",
           f"{prefix}/lm_eval_version": importlib.metadata.version("lm_eval")}
    for r in results_table(runs).itertuples():
        key = f"{prefix}/{r.model}"
        out.update({key: _round(r.acc), f"{key}/se": _round(r.acc_stderr), f"{key}/ci95_low": _round(r.ci95_low),
                    f"{key}/ci95_high": _round(r.ci95_high), f"{key}/n": int(r.n), f"{key}/seconds": round(r.seconds, 1)})
    if runs:
        out[f"{prefix}_by_subject"] = {r.model: {s.subject: round(float(s.acc), 4) for s in r.subjects.itertuples()}
                                       for r in runs}
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="MMLU through lm-evaluation-harness (starling_lib.mmlu)")
    parser.add_argument("--precache", action="store_true",
                        help=f"download the 57 subjects of {MMLU_DATASET} into the datasets cache, as lm-eval reads them")
    args = parser.parse_args()
    if args.precache:
        precache()
    else:
        parser.print_help()
