"""MT-Bench (Zheng et al., 2023, arXiv:2306.05685): 80 two-turn questions, each answer rated 1-10 by a judge.

The protocol is FastChat's `llm_judge` (gen_model_answer.py, gen_judgment.py, show_result.py) on the
bundled questions, GPT-4 reference answers and judge prompts (bundled/PROVENANCE.md):

  * answers: the model's own chat template, temperature by category (writing/roleplay 0.7,
    stem/humanities 0.1, the rest greedy), the second turn generated after the first answer;
  * single-answer grading: `single-v1` for turn 1 and `single-v1-multi-turn` for turn 2 (both turns
    shown, only the second rated); math, reasoning and coding use the reference-answer prompts
    `single-math-v1` / `single-math-v1-multi-turn`;
  * `parse_rating`: `[[N]]`, else `[N]`, else -1. A -1 is a failed judgment: counted, never scored;
  * score: the mean of all valid (question, turn) ratings (`scores`), per category too.

Judges (all answer `rate(prompts, progress=False, on_rating=None) -> list[Rating]`, each Rating
saying which `mode` made it, and call `on_rating(i, rating)` as soon as the judgment of `prompts[i]`
is made, so that `judge_answers` caches it at once):
  * `ApiJudge`: any OpenAI-compatible endpoint (GPT-4, a local vLLM server) through
    `llm_client.ChatClient` (retries, key from the environment only), temperature 0, 2048 tokens,
    as FastChat. Mode "generate".
  * `LocalJudge`: a Hugging Face causal LM prompted with the same judge prompts. Mode "generate"
    (write a judgment, parse it) or "likelihood": after the judge prompt and `Rating: [[`, read the
    model's probabilities of the continuations "1]]" ... "10]]", renormalise over the ten and report
    the expected rating, as G-Eval (Liu et al., 2023, arXiv:2303.16634) does. Every answer gets a
    number, which a small local judge, that rarely writes a parsable `[[N]]`, would not give.

Answers and judgments are cached as JSONL (`jsonl_cache.JsonlCache`) keyed by (model, question,
turn) and (model, question, turn, judge), so an interrupted evaluation resumes without
regenerating or re-judging. A judgment is cached the moment it arrives, not when its batch is done:
a paid API judgment is never asked for twice, whether the run is killed or the endpoint stops it
(a 401 mid-batch) before the batch ends. (A judge whose `rate` takes no `on_rating` is cached
per batch.) A cached answer is reused only if it was generated with the same settings and model
weights (and, for turn 2, after the same first answer); a cached judgment only if the judge prompt
(which holds the answers) is unchanged.

Departures from FastChat:
  * the likelihood mode is new (not part of MT-Bench): its scores are a local judge's expected
    ratings without a written explanation first, and are not comparable with GPT-4 scores; the
    mode is recorded beside every score;
  * a local judge has no system role in the OpenChat template: the judge's system prompt is put
    before the user prompt in one user message;
  * a failed API request is rated -1 like FastChat's "$ERROR$", but is not cached, so a rerun asks
    again;
  * sampled answers (temperature > 0) are seeded per batch, so they are repeatable for the same
    batches, not identical to FastChat's.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from starling_lib import chat
from starling_lib.data import bundled_path
from starling_lib.jsonl_cache import JsonlCache, content_hash
from starling_lib.llm_client import ChatClient, ClientConfig, RequestError

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
# FastChat's temperature_config: sampled for creative categories, near-greedy for knowledge, greedy else.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
NEED_REF_CATS = ("math", "reasoning", "coding")
RATINGS = list(range(1, 11))

# The evaluation table of the Starling-LM-7B-alpha model card (MT-Bench with GPT-4 as judge;
# AlpacaEval is version 1.0, win rate against text-davinci-003; MMLU 5-shot). None: not reported.
PUBLISHED = [
    ("GPT-4-Turbo", "?", 9.32, 97.70, None),
    ("GPT-4", "SFT + PPO", 8.99, 95.28, 86.4),
    ("Starling-7B", "C-RLFT + APA", 8.09, 91.99, 63.9),
    ("Claude-2", "?", 8.06, 91.36, 78.5),
    ("GPT-3.5-Turbo", "?", 7.94, 89.37, 70.0),
    ("Claude-1", "?", 7.90, 88.39, 77.0),
    ("Tulu-2-dpo-70b", "SFT + DPO", 7.89, 95.1, None),
    ("Openchat-3.5", "C-RLFT", 7.81, 88.51, 64.3),
    ("Zephyr-7B-beta", "SFT + DPO", 7.34, 90.60, 61.4),
    ("Llama-2-70b-chat-hf", "SFT + PPO", 6.86, 92.66, 63.0),
    ("Neural-chat-7b-v3-1", "SFT + DPO", 6.84, 84.53, 62.4),
    ("Tulu-2-dpo-7b", "SFT + DPO", 6.29, 85.1, None),
]


def published_table() -> pd.DataFrame:
    """The model card's table: model, tuning, mt_bench (GPT-4 judge), alpaca_eval_v1, mmlu."""
    return pd.DataFrame(PUBLISHED, columns=["model", "tuning", "mt_bench", "alpaca_eval_v1", "mmlu"])


# ----------------------------------------------------------------------------------------------
# Questions and judge prompts

def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_questions(per_category: int = 0, categories: Sequence[str] | None = None) -> list[dict]:
    """The MT-Bench questions in file order, each with `reference` (the two GPT-4 reference
    answers, for math/reasoning/coding) or None.

    per_category: keep the first n questions of each category (0: all ten).
    categories: keep only these categories (None: all eight).
    """
    refs = {r["question_id"]: r["choices"][0]["turns"]
            for r in _read_jsonl(bundled_path("mt_bench", "reference_answer", "gpt-4.jsonl"))}
    unknown = set(categories or []) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown MT-Bench categories {sorted(unknown)}; known: {CATEGORIES}")
    questions, taken = [], dict.fromkeys(CATEGORIES, 0)
    for q in _read_jsonl(bundled_path("mt_bench", "question.jsonl")):
        if categories and q["category"] not in categories:
            continue
        if per_category and taken[q["category"]] >= per_category:
            continue
        taken[q["category"]] += 1
        questions.append({**q, "reference": refs.get(q["question_id"])})
    return questions


def question_table(questions: Sequence[Mapping]) -> pd.DataFrame:
    """Per category: questions kept, generation temperature, and the judge prompts of turns 1 and 2."""
    counts = pd.Series([q["category"] for q in questions]).value_counts()
    return pd.DataFrame([{"category": c, "questions": int(counts.get(c, 0)), "temperature": TEMPERATURE[c],
                          "judge_prompt_turn_1": judge_prompt_name(c, 1), "judge_prompt_turn_2": judge_prompt_name(c, 2)}
                         for c in CATEGORIES]).set_index("category")


def load_judge_prompts() -> dict[str, dict]:
    """FastChat's judge prompts by name (single-v1, single-math-v1, their -multi-turn forms, pair-*)."""
    return {p["name"]: p for p in _read_jsonl(bundled_path("mt_bench", "judge_prompts.jsonl"))}


def judge_prompt_name(category: str, turn: int) -> str:
    """The single-answer judge prompt FastChat uses for a question's category and turn (1 or 2)."""
    if turn not in (1, 2):
        raise ValueError(f"MT-Bench questions have turns 1 and 2, got {turn}")
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return name + ("-multi-turn" if turn == 2 else "")


def judge_prompt(question: Mapping, answers: Sequence[str], turn: int,
                 prompts: Mapping[str, dict] | None = None) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) to judge `answers[turn - 1]` of `question`."""
    prompts = prompts or load_judge_prompts()
    name = judge_prompt_name(question["category"], turn)
    template = prompts[name]
    q = question["turns"]
    if turn == 1:
        fields = {"question": q[0], "answer": answers[0]}
    else:
        fields = {"question_1": q[0], "question_2": q[1], "answer_1": answers[0], "answer_2": answers[1]}
    if question["category"] in NEED_REF_CATS:
        if not question.get("reference"):
            raise ValueError(f"question {question['question_id']} ({question['category']}) needs its reference answer")
        fields["ref_answer_1"] = question["reference"][0]
        if turn == 2:
            fields["ref_answer_2"] = question["reference"][1]
    return name, template["system_prompt"], template["prompt_template"].format(**fields)


# FastChat's patterns: the first [[N]], else the first [N]; N an integer or decimal.
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str | None) -> float:
    """The judge's rating as a float, or -1.0 when it gave none.

    FastChat's rule, unchanged: the first `[[N]]`, else the first `[N]` (N digits with at most one
    decimal point); anything else (no brackets, `[[A]]`, `[[-3]]`, `[[ 7 ]]`, an empty reply) is -1.
    Out-of-range values are not clipped, as in the original.
    """
    if not text:
        return -1.0
    match = _RATING.search(text) or _RATING_BACKUP.search(text)
    return float(match.group(1)) if match else -1.0


# ----------------------------------------------------------------------------------------------
# Judges

@dataclass
class Rating:
    """One judgment."""

    rating: float                      # 1-10, or -1 when there is none (a failed judgment)
    mode: str                          # "generate" (parsed from a written judgment) or "likelihood"
    text: str = ""                     # the judge's output ("" in likelihood mode)
    probs: list[float] | None = None   # likelihood mode: P(rating = 1..10), summing to 1
    error: str | None = None           # the request failed; such a Rating is not cached


class ApiJudge:
    """A judge behind an OpenAI-compatible endpoint (GPT-4 for MT-Bench), via llm_client.ChatClient.

    `client`: a `ChatClient`; by default one from the environment (STARLING_JUDGE_BASE_URL,
    `model` or STARLING_JUDGE_MODEL, STARLING_JUDGE_API_KEY / OPENAI_API_KEY), at temperature 0
    with 2048 output tokens, FastChat's settings.
    """

    mode = "generate"

    def __init__(self, model: str | None = None, client: ChatClient | None = None):
        if client is None:
            client = ChatClient(ClientConfig.from_env(model, temperature=0.0, max_tokens=2048))
        self.client = client
        self.id = f"api:{client.config.model}"

    def __repr__(self) -> str:
        return f"ApiJudge({self.id!r})"

    def rate(self, prompts: Sequence[tuple[str, str]], progress: bool = False,
             on_rating: Callable[[int, Rating], None] | None = None) -> list[Rating]:
        """One Rating per (system, user) prompt, each passed to `on_rating(i, rating)` as it arrives.

        A failed request is a Rating of -1 with its `error`; a ClientError (bad key, unknown model)
        stops the run, after `on_rating` has seen every judgment already paid for."""
        from tqdm.auto import tqdm

        out = []
        for i, (system, user) in enumerate(tqdm(prompts, desc="judging", disable=not progress)):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            try:
                text = self.client.complete_messages(messages).text
                rating = Rating(parse_rating(text), self.mode, text=text)
            except RequestError as e:
                rating = Rating(-1.0, self.mode, error=str(e))
            out.append(rating)
            if on_rating is not None:
                on_rating(i, rating)
        return out


def render_judge_prompt(tokenizer, system: str, user: str) -> str:
    """A judge prompt in a local judge's chat template, ready for the judge's reply.

    The OpenChat template has no system role, so the system prompt goes first in the user turn.
    Shared by the local judges of MT-Bench (`LocalJudge`) and AlpacaEval (alpaca.LocalPairwiseJudge).
    """
    content = f"{system.rstrip()}\n\n{user}" if system.strip() else user
    return chat.render(tokenizer, [{"role": "user", "content": content}])


def start_reply(prompt: str, text: str = "") -> str:
    """`prompt` followed by the start of the reply: `text` after the separator the template wants.

    OpenChat's "...Assistant:" is followed by a space before the reply; templates that end in a
    newline (Llama-3, ChatML) are not.
    """
    return prompt + (" " if prompt.endswith(":") else "") + text


class LocalJudge:
    """A Hugging Face causal LM as the judge, prompted with the MT-Bench judge prompts.

    mode "likelihood": the expected rating under the model's probabilities of "1]]".."10]]" after
    the judge prompt and `Rating: [[` (renormalised over the ten ratings); never -1.
    mode "generate": the model writes a judgment (greedy, `max_new_tokens`), parsed by `parse_rating`.
    """

    def __init__(self, model, tokenizer, name: str, mode: str = "likelihood", max_new_tokens: int = 512,
                 batch_size: int = 4):
        if mode not in ("likelihood", "generate"):
            raise ValueError(f"mode must be 'likelihood' or 'generate', got {mode!r}")
        self.model, self.tokenizer, self.mode, self.name = model, tokenizer, mode, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.id = f"local:{name}:{mode}"

    def __repr__(self) -> str:
        return f"LocalJudge({self.id!r})"

    def rating_probs(self, system: str, user: str) -> np.ndarray:
        """P(rating = 1..10 | judge prompt, 'Rating: [['), shape [10], summing to 1."""
        prefix = start_reply(render_judge_prompt(self.tokenizer, system, user), "Rating: [[")
        logps = chat.continuation_logprobs(self.model, self.tokenizer, prefix, [f"{r}]]" for r in RATINGS])
        return logps.double().softmax(-1).numpy()

    def rate(self, prompts: Sequence[tuple[str, str]], progress: bool = False,
             on_rating: Callable[[int, Rating], None] | None = None) -> list[Rating]:
        """One Rating per (system, user) prompt, each passed to `on_rating(i, rating)` when made
        (in generate mode, when the batched generation is done)."""
        from tqdm.auto import tqdm

        if self.mode == "generate":
            rendered = [render_judge_prompt(self.tokenizer, s, u) for s, u in prompts]
            texts = chat.generate(self.model, self.tokenizer, rendered, chat.DecodingConfig(
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size), progress=progress, desc="judging")
            out = [Rating(parse_rating(t), self.mode, text=t) for t in texts]
            for i, rating in enumerate(out if on_rating is not None else []):
                on_rating(i, rating)
            return out
        out = []
        for i, (system, user) in enumerate(tqdm(prompts, desc="judging (likelihood)", disable=not progress)):
            p = self.rating_probs(system, user)
            out.append(Rating(float(np.dot(p, RATINGS)), self.mode, probs=[float(x) for x in p]))
            if on_rating is not None:
                on_rating(i, out[-1])
        return out


def make_judge(judge: str, judge_model: str = "tiny", judge_mode: str = "likelihood", device: str | None = None,
               max_new_tokens: int = 512):
    """A judge from notebook parameters.

    judge "local": `judge_model` (a hub id, a path or "tiny", loaded with models.load_model_and_tokenizer)
    in `judge_mode`. "env": the OpenAI-compatible endpoint with the model named by STARLING_JUDGE_MODEL.
    Anything else: that model name at the endpoint (e.g. "gpt-4", MT-Bench's judge).
    """
    if judge == "local":
        from starling_lib.models import load_model_and_tokenizer
        model, tokenizer = load_model_and_tokenizer(judge_model, device=device or None)
        return LocalJudge(model, tokenizer, model_label(judge_model), judge_mode, max_new_tokens)
    return ApiJudge(model=None if judge == "env" else judge)


# ----------------------------------------------------------------------------------------------
# Model names and the weights' fingerprint for the caches

def model_label(name_or_path: str) -> str:
    """A short name for metric keys and tables: the last part of a hub id or path ("tiny" stays)."""
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def model_fingerprint(model) -> str:
    """Identifies the weights: a local folder's file names, sizes and mtimes, else the hub id.

    Cheap (no hashing of gigabytes) and changes whenever a policy is saved again.
    """
    where = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    folder = Path(where)
    if folder.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
        return content_hash(where, files)
    return where


# ----------------------------------------------------------------------------------------------
# Answers and judgments

def conversation(question: Mapping, answers: Sequence[str], turn: int) -> list[dict]:
    """The chat messages the model answers at `turn`: turn 2 sees question 1 and its answer."""
    messages = [{"role": "user", "content": question["turns"][0]}]
    if turn == 2:
        messages += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": question["turns"][1]}]
    return messages


def generate_answers(model, tokenizer, questions: Sequence[Mapping], model_name: str, cache_path: str | os.PathLike,
                     *, max_new_tokens: int = 1024, temperature: float | None = None, batch_size: int = 8,
                     seed: int = 0, progress: bool = True, engine: str = "auto") -> dict[int, list[str]]:
    """{question_id: [answer turn 1, answer turn 2]}, generated or taken from the cache.

    engine: chat.DecodingConfig's (e.g. "vllm"); not part of the cache key, as the sampler never was.

    temperature: None uses MT-Bench's per-category temperatures; a number overrides them all.
    Generation runs in batches of `batch_size` questions, each at its own temperature; each batch
    is cached as soon as it is done.
    """
    from tqdm.auto import tqdm

    cache = JsonlCache(cache_path, ("model", "question_id", "turn"))
    fingerprint = model_fingerprint(model)
    answers: dict[int, list[str]] = {q["question_id"]: [] for q in questions}
    with tqdm(total=2 * len(questions), desc=f"answers of {model_name}", disable=not progress) as bar:
        for turn in (1, 2):
            todo = []
            for q in questions:
                qid = q["question_id"]
                temp = TEMPERATURE[q["category"]] if temperature is None else temperature
                settings = {"max_new_tokens": max_new_tokens, "temperature": temp, "seed": seed,
                            "weights": fingerprint, "context": content_hash(answers[qid][:turn - 1])}
                hit = cache.get(model_name, qid, turn)
                if hit is not None and hit["settings"] == settings:
                    answers[qid].append(hit["answer"])
                    bar.update(1)
                else:
                    todo.append((q, settings))
            todo.sort(key=lambda item: item[1]["temperature"])
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                # One call for the batch, each question at its category's temperature (the fast
                # engine mixes them in one decoding loop; model.generate runs once per temperature).
                prompts = [chat.render(tokenizer, conversation(q, answers[q["question_id"]], turn)) for q, _ in batch]
                config = chat.DecodingConfig(max_new_tokens=max_new_tokens, batch_size=len(batch), seed=seed + start,
                                             engine=engine)
                replies = chat.generate(model, tokenizer, prompts, config,
                                        temperatures=[settings["temperature"] for _, settings in batch])
                for (q, settings), reply in zip(batch, replies):
                    cache.put({"model": model_name, "question_id": q["question_id"], "turn": turn,
                               "category": q["category"], "answer": reply, "settings": settings})
                    answers[q["question_id"]].append(reply)
                bar.update(len(batch))
    return answers


def judge_answers(questions: Sequence[Mapping], answers: Mapping[int, Sequence[str]], model_name: str, judge,
                  cache_path: str | os.PathLike, *, batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """One row per (question, turn): model, question_id, category, turn, judge, mode, prompt_name,
    rating (-1: failed), judgment (the judge's text), probs (likelihood mode), error.

    Judgments come from the cache when the judge prompt is unchanged; each new one is cached as
    soon as the judge hands it over (`on_rating`; per batch for a judge without it), except failed
    requests (a rerun asks again). An interruption, or a ClientError from the endpoint, therefore
    loses no judgment already made.
    """
    from tqdm.auto import tqdm

    cache = JsonlCache(cache_path, ("model", "question_id", "turn", "judge"))
    prompts = load_judge_prompts()
    rows, todo = [], []
    for q in questions:
        for turn in (1, 2):
            name, system, user = judge_prompt(q, answers[q["question_id"]], turn, prompts)
            base = {"model": model_name, "question_id": q["question_id"], "category": q["category"], "turn": turn,
                    "judge": judge.id, "prompt_name": name, "prompt_sha": content_hash(system, user)}
            hit = cache.get(model_name, q["question_id"], turn, judge.id)
            if hit is not None and hit["prompt_sha"] == base["prompt_sha"]:
                rows.append(hit)
            else:
                todo.append((base, system, user))
    streams = _takes_on_rating(judge.rate)
    with tqdm(total=len(todo), desc=f"judging {model_name}", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            done: dict[int, Rating] = {}

            def keep(i: int, r: Rating) -> None:   # cache a judgment the moment it is made, once
                if i in done:
                    return
                done[i] = r
                row = {**batch[i][0], "mode": r.mode, "rating": r.rating, "judgment": r.text, "probs": r.probs,
                       "error": r.error}
                if r.error is None:
                    cache.put(row)
                rows.append(row)
                bar.update(1)

            prompts_of_batch = [(s, u) for _, s, u in batch]
            ratings = judge.rate(prompts_of_batch, on_rating=keep) if streams else judge.rate(prompts_of_batch)
            if len(ratings) != len(batch):
                raise RuntimeError(f"judge {judge.id} returned {len(ratings)} ratings for {len(batch)} prompts")
            for i, r in enumerate(ratings):
                keep(i, r)
    columns = ["model", "question_id", "category", "turn", "judge", "mode", "prompt_name", "rating", "judgment",
               "probs", "error"]
    return pd.DataFrame(rows).reindex(columns=columns).sort_values(["question_id", "turn"], ignore_index=True)


def _takes_on_rating(rate) -> bool:
    """Whether a judge's `rate` accepts `on_rating` (judges written before it was added do not)."""
    params = inspect.signature(rate).parameters.values()
    return any(p.name == "on_rating" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def evaluate(model, tokenizer, model_name: str, questions: Sequence[Mapping], judge, cache_dir: str | os.PathLike,
             *, max_new_tokens: int = 1024, temperature: float | None = None, batch_size: int = 8, seed: int = 0,
             progress: bool = True) -> tuple[dict[int, list[str]], pd.DataFrame]:
    """Answer and judge: (answers, judgments). Caches: cache_dir/answers.jsonl, cache_dir/judgments.jsonl."""
    answers = generate_answers(model, tokenizer, questions, model_name, Path(cache_dir) / "answers.jsonl",
                               max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                               seed=seed, progress=progress)
    judgments = judge_answers(questions, answers, model_name, judge, Path(cache_dir) / "judgments.jsonl",
                              batch_size=batch_size, progress=progress)
    return answers, judgments


def resolve_models(models: str, policies_dir: str, run_dir: str) -> dict[str, str]:
    """{label: hub id or path} to evaluate: the comma-separated `models`, then every saved policy.

    policies_dir "" means `{run_dir}/04_policy_tuning/policies` (run_dir "" means the interactive
    run folder). Each sub-folder holding a config.json is a policy (a `from_pretrained` folder).
    A missing folder is reported, not an error: notebook 04 may not have run.
    """
    from starling_lib.runs import INTERACTIVE_RUN_DIR, POLICY_STAGE

    specs = {model_label(m.strip()): m.strip() for m in models.split(",") if m.strip()}
    folder = Path(policies_dir) if policies_dir else Path(run_dir or INTERACTIVE_RUN_DIR) / POLICY_STAGE / "policies"
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
        print(f"{len(found)} saved polic{'y' if len(found) == 1 else 'ies'} in {folder}: {[p.name for p in found]}")
        for p in found:
            label = p.name if p.name not in specs else f"policy-{p.name}"
            specs[label] = str(p)
    else:
        print(f"no saved policies at {folder} (notebook 04 has not run there); evaluating only {list(specs)}")
    if not specs:
        raise ValueError("nothing to evaluate: `models` is empty and no saved policies were found")
    return specs


@dataclass
class Evaluation:
    """What `evaluate_models` returns: every model's answers and all judgments."""

    answers: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # model -> question_id -> turns
    judgments: pd.DataFrame | None = None


def evaluate_models(specs: Mapping[str, str], questions: Sequence[Mapping], judge, cache_dir: str | os.PathLike, *,
                    device: str | None = None, max_new_tokens: int = 1024, temperature: float | None = None,
                    batch_size: int = 8, seed: int = 0, progress: bool = True) -> Evaluation:
    """Load each model of `specs` ({label: id or path}) in turn, answer and judge; free it before the next."""
    import gc

    import torch

    from starling_lib.models import load_model_and_tokenizer
    result, frames = Evaluation(), []
    for label, name in specs.items():
        model, tokenizer = load_model_and_tokenizer(name, device=device or None)
        answers, judgments = evaluate(model, tokenizer, label, questions, judge, cache_dir,
                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                      batch_size=batch_size, seed=seed, progress=progress)
        result.answers[label] = answers
        frames.append(judgments)
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.judgments = pd.concat(frames, ignore_index=True)
    return result


# ----------------------------------------------------------------------------------------------
# Scores and tables

def _valid(judgments: pd.DataFrame) -> pd.DataFrame:
    return judgments[judgments["rating"] != -1]


def _question_se(ratings: pd.DataFrame) -> float:
    """Standard error of a mean rating over questions: a question's turns share it, so each
    question's mean is one observation."""
    per_question = ratings.groupby("question_id")["rating"].mean()
    return float(per_question.std(ddof=1) / np.sqrt(len(per_question))) if len(per_question) > 1 else float("nan")


def scores(judgments: pd.DataFrame) -> pd.DataFrame:
    """Per model (and judge, mode): mt_bench = mean of the valid ratings, mt_bench_se its standard
    error over questions; turn_1, turn_2; n_valid, n_failed (ratings of -1, excluded from every mean)."""
    group = ["model", "judge", "mode"]
    valid = _valid(judgments)
    out = valid.groupby(group)["rating"].mean().rename("mt_bench").to_frame()
    out["mt_bench_se"] = valid.groupby(group)[["question_id", "rating"]].apply(_question_se)
    for turn in (1, 2):
        out[f"turn_{turn}"] = valid[valid["turn"] == turn].groupby(group)["rating"].mean()
    counts = judgments.assign(failed=judgments["rating"] == -1).groupby(group)["failed"].agg(["size", "sum"])
    out = out.reindex(counts.index)  # a model whose every judgment failed keeps its row, with NaN scores
    out["n_valid"] = (counts["size"] - counts["sum"]).astype(int)
    out["n_failed"] = counts["sum"].astype(int)
    return out.reset_index().sort_values("mt_bench", ascending=False, ignore_index=True)


def category_scores(judgments: pd.DataFrame) -> pd.DataFrame:
    """Long table model, category, score (mean of valid ratings), n_valid; categories in MT-Bench order."""
    out = (_valid(judgments).groupby(["model", "category"])["rating"].agg(score="mean", n_valid="size")
           .reset_index())
    out["category"] = pd.Categorical(out["category"], categories=CATEGORIES, ordered=True)
    return out.sort_values(["model", "category"], ignore_index=True)


def rating_distribution(judgments: pd.DataFrame) -> pd.DataFrame:
    """Long table model, rating (1..10), share: how each model's ratings spread over the scale.

    Likelihood judgments contribute their probabilities, written judgments their (rounded) valid
    ratings; a model's shares sum to 1.
    """
    rows = []
    for model, group in judgments.groupby("model"):
        probs = [p for p in group["probs"] if isinstance(p, list)]
        written = _valid(group[group["mode"] != "likelihood"])["rating"].round().clip(1, 10)
        counts = np.sum(probs, axis=0) if probs else np.zeros(len(RATINGS))
        counts = counts + np.bincount(written.astype(int) - 1, minlength=len(RATINGS))[:len(RATINGS)]
        total = counts.sum()
        rows += [{"model": model, "rating": r, "share": c / total if total else 0.0} for r, c in zip(RATINGS, counts)]
    return pd.DataFrame(rows)


def category_metrics(categories: pd.DataFrame) -> dict:
    """{model: {category: score}} of `category_scores`, rounded, for metrics.json."""
    return {model: {str(r.category): round(float(r.score), 4) for r in group.itertuples()}
            for model, group in categories.groupby("model")}


def side_by_side(questions: Sequence[Mapping], answers: Mapping[str, Mapping[int, Sequence[str]]], turn: int = 1,
                 n: int = 3, max_chars: int = 300) -> pd.DataFrame:
    """The first `n` questions' turn-`turn` prompt and each model's answer (truncated), one row each."""
    rows = []
    for q in questions[:n]:
        row = {"question_id": q["question_id"], "category": q["category"], "question": q["turns"][turn - 1][:max_chars]}
        row.update({model: a[q["question_id"]][turn - 1][:max_chars] for model, a in answers.items()})
        rows.append(row)
    return pd.DataFrame(rows).set_index("question_id")


def paired_difference(judgments: pd.DataFrame, model: str, baseline: str) -> dict[str, float]:
    """`model`'s MT-Bench score minus `baseline`'s on the questions both have valid ratings for:
    diff (mean over questions of the per-question difference), se (its standard error), n questions."""
    valid = _valid(judgments)
    per = valid.groupby(["model", "question_id"])["rating"].mean().unstack("model")
    d = (per[model] - per[baseline]).dropna()
    return {"diff": float(d.mean()) if len(d) else float("nan"),
            "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"), "n": int(len(d))}


def comparable_to_published(run_scores: pd.DataFrame, num_questions: int) -> pd.Series:
    """Which of this run's rows may stand beside the model card's: judged by GPT-4 on all 80 questions."""
    return run_scores["judge"].astype(str).str.contains("gpt-4") & (num_questions == 80)


def comparison_table(run_scores: pd.DataFrame, num_questions: int = 80) -> pd.DataFrame:
    """The published GPT-4-judged scores, and this run's where `comparable_to_published` (column `source`).

    Another judge's ratings, or a subset of the questions, are on another scale: they are left out
    rather than drawn on the same axis."""
    ours = run_scores[comparable_to_published(run_scores, num_questions)]
    ours = ours.assign(source=lambda d: "this run, judge " + d["judge"])[["model", "mt_bench", "source"]]
    theirs = published_table()[["model", "mt_bench"]].assign(source="published: GPT-4 judge (model card)")
    return pd.concat([ours, theirs], ignore_index=True)


def score_metrics(run_scores: pd.DataFrame, prefix: str = "eval/mt_bench") -> dict:
    """Flat metrics: `{prefix}/{model}` the score, and its turn scores, counts, judge and mode beside it."""
    out = {}
    for r in run_scores.itertuples():
        key = f"{prefix}/{r.model}"
        out[key] = None if pd.isna(r.mt_bench) else round(float(r.mt_bench), 4)
        out[f"{key}/se"] = None if pd.isna(r.mt_bench_se) else round(float(r.mt_bench_se), 4)
        out[f"{key}/turn_1"] = None if pd.isna(r.turn_1) else round(float(r.turn_1), 4)
        out[f"{key}/turn_2"] = None if pd.isna(r.turn_2) else round(float(r.turn_2), 4)
        out[f"{key}/n_valid"] = int(r.n_valid)
        out[f"{key}/n_failed"] = int(r.n_failed)
        out[f"{key}/judge"] = r.judge
        out[f"{key}/judge_mode"] = r.mode
    return out


def eval_metrics(run_scores: pd.DataFrame, categories: pd.DataFrame, questions: Sequence[Mapping], judge,
                 models: Sequence[str]) -> dict:
    """Notebook 05's MT-Bench metrics: `score_metrics`, the scores by category (`category_metrics`
    of a `category_scores` table), the number of questions, the judge and its mode, and the models
    evaluated (`eval/models`)."""
    return {**score_metrics(run_scores),
            "eval/mt_bench/num_questions": len(questions),
            "eval/mt_bench/judge": judge.id,
            "eval/mt_bench/judge_mode": judge.mode,
            "eval/mt_bench_by_category": category_metrics(categories),
            "eval/models": list(models)}
