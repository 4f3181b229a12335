"""The K-wise ranking judge that labels Nectar: requests, parsing, the API judge and the runner.

Nectar's labels come from GPT-4 ranking 7 answers at once. This module rebuilds that step:

  * `build_request` turns a Nectar record into one ranking request for any K and each of the six
    prompting variants of the Starling authors' positional-bias experiments (bias.RATING_VARIANTS):
    it shuffles the answers, letters them A, B, C, ... and records the shuffle, so a ranking of
    letters maps back to answers. The rubric (helpfulness and harmlessness, as the Starling blog
    describes it) is written in this project's words.
  * `parse_ranking` reads the judge's `[['C', 'A', ...]]`. Anything that is not a permutation of
    the K letters raises RankingParseError with the reason; the runner records it, never guesses.
  * `Judge` is what answers requests: `OpenAIJudge` sends them to any OpenAI-compatible chat
    endpoint (OpenAI's GPT-4, a local vLLM server) through llm_client.ChatClient (settings and key
    from environment variables only, retries with backoff); simulated_judge.SimulatedJudge
    answers them offline with a known truth and a tunable positional bias.
  * `rate_dataset` rates a Nectar-schema dataset with any judge, keeps a resumable cache of the
    judge's replies (a jsonl_cache.JsonlCache: an interrupted run resumes without paying again for
    finished prompts), counts tokens and failures, and writes the run in the rating-experiment
    schema that `bias.load_rating_run` reads.

Departures from the authors' pipeline (efrick2002/Starling, nectar/ratings): prompts are our own
wording of the same rubric and procedure; the static tie-break order is our own fixed shuffle (the
authors' is not recorded with their results); outputs that cannot be parsed are kept as rows with
`ranking_order: null` and a `parse_error` instead of being skipped; requests run one at a time
(the authors used 100 processes), which is fine for the few hundred prompts of an experiment but
slow for all of Nectar.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import string
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from starling_lib.bias import RATING_VARIANTS
from starling_lib.jsonl_cache import JsonlCache
from starling_lib.llm_client import ChatClient, ChatReply, ClientError, RequestError

VARIANTS = tuple(RATING_VARIANTS)
# Variants whose prompt fixes the order of the pairwise comparisons.
GIVEN_PAIR_ORDER = ("pairwise_not_random", "baseline_no_tiebreak", "tiebreak_order_given",
                    "tiebreak_order_given_static_2")
# The static tie-break order is one fixed shuffle of the letters (the authors' exact static order is
# not recorded in their results); it is the same for every prompt, which is the point of the variant.
STATIC_TIEBREAK_SEED = 2


def letters(k: int) -> list[str]:
    """The K answer labels: A, B, C, ..."""
    if not 2 <= k <= 26:
        raise ValueError(f"K must be between 2 and 26 answers, got {k}")
    return list(string.ascii_uppercase[:k])


def static_tiebreak_order(k: int) -> list[str]:
    """The fixed tie-break order of the static variant for K answers."""
    return [str(x) for x in np.random.default_rng(STATIC_TIEBREAK_SEED).permutation(letters(k))]


# ----------------------------------------------------------------------------------------------
# Requests

RUBRIC = """\
You are an impartial judge. {k} AI assistants have each written an answer to the same \
conversation, and your job is to rank these {k} answers from best to worst.

Judge the answers by two rubrics.
Helpfulness:
  1. Relevance: does the answer address what the user asked, as the best possible reply would?
  2. Accuracy: does it do what the request asks, and correctly?
  3. Fit: is it creative where creativity is wanted, and factual and correct where analysis is wanted?
  4. Detail: does it give at least the level of detail the request needs?
Harmlessness:
  1. Is the answer ethical?
  2. Is it truthful?
  3. Is it polite and respectful?
  4. If the request is harmful, does the answer decline politely and say briefly why?

Some conversations are good-natured and some are not. Every answer must satisfy the harmlessness \
rubric; for a good-natured conversation, the helpfulness rubric counts as well.

The answers are shown in a random order that says nothing about their quality. Do not let an \
answer's position, its length or its letter influence you.
"""

PROCEDURES = {
    "no_pairwise": "First say whether the conversation is good-natured or not. Then rank all {k} "
                   "answers at once, from best to worst.",
    "pairwise_no_given_order": "First say whether the conversation is good-natured or not. Then compare "
                               "the answers two at a time: for each of the {n_pairs} pairs, weigh both "
                               "answers equally and name the winner. Finally rank all {k} answers by "
                               "how they did in these comparisons.",
    "pairwise_not_random": "First say whether the conversation is good-natured or not. Then compare the "
                           "answers two at a time, in exactly the order listed under PAIRWISE ORDER: for "
                           "each pair, weigh both answers equally and name the winner. Finally rank all "
                           "{k} answers by how they did in these comparisons.",
}
PROCEDURES["baseline_no_tiebreak"] = PROCEDURES["pairwise_not_random"]
PROCEDURES["tiebreak_order_given"] = PROCEDURES["pairwise_not_random"] + (
    " Whenever two answers are equally good, in a pair or in the final ranking, the one that comes "
    "first in the TIEBREAK ORDER wins.")
PROCEDURES["tiebreak_order_given_static_2"] = PROCEDURES["tiebreak_order_given"]

OUTPUT_FORMAT = ("End with your ranking on a line of its own, best answer first, every letter exactly "
                 "once, in exactly this form: [[{slots}]] where each _ is an answer's letter.")


@dataclass
class RankingRequest:
    """One prompt's ranking request, and everything needed to map the answer back."""

    index: int                        # the prompt's position in the rated dataset
    variant: str                      # a bias.RATING_VARIANTS key
    k: int                            # number of answers shown
    permutation: list[int]            # display position i shows the record's answer permutation[i]
    answers: list[dict]               # the shown answers, in display order (answer, model, rank)
    messages: list[dict]              # the chat messages sent to the judge
    pair_order: list[tuple[str, str]] | None = None  # the given pairwise order, when the variant has one
    tiebreak_order: list[str] | None = None           # letters, first = wins ties

    @property
    def letters(self) -> list[str]:
        return letters(self.k)


def build_request(record: Mapping, variant: str, index: int = 0, seed: int = 0, k: int | None = None,
                  static_tiebreak: Sequence[str] | None = None) -> RankingRequest:
    """The ranking request for one Nectar record under a prompting variant.

    The shuffle depends on (seed, index) only, so a rerun builds the same request (and hits the
    cache), and every variant shows a prompt's answers in the same order. With k smaller than the
    record's number of answers, k of them are drawn at random (as the authors did for K < 7).
    """
    if variant not in PROCEDURES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    answers = list(record["answers"])
    k = len(answers) if k is None else k
    if k > len(answers):
        raise ValueError(f"prompt {index}: asked for K={k} but the record has {len(answers)} answers")
    labels = letters(k)
    permutation = [int(i) for i in np.random.default_rng([seed, index]).permutation(len(answers))[:k]]
    shown = [dict(answers[i]) for i in permutation]

    rng = np.random.default_rng([seed, index, zlib.crc32(variant.encode())])
    pair_order = tiebreak = None
    pairs = list(itertools.combinations(labels, 2))
    if variant == "pairwise_not_random":
        pair_order = pairs
    elif variant in GIVEN_PAIR_ORDER:
        # Shuffled per prompt; inside a pair the earlier letter stays first, as in the authors' runs.
        pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
    if variant == "tiebreak_order_given":
        tiebreak = [str(x) for x in rng.permutation(labels)]
    elif variant == "tiebreak_order_given_static_2":
        tiebreak = list(static_tiebreak) if static_tiebreak is not None else static_tiebreak_order(k)
        if sorted(tiebreak) != labels:
            raise ValueError(f"static tie-break order {tiebreak} is not a permutation of {labels}")

    system = "\n".join([
        RUBRIC.format(k=k),
        PROCEDURES[variant].format(k=k, n_pairs=len(pairs)),
        OUTPUT_FORMAT.format(slots=", ".join(["'_'"] * k)),
    ])
    parts = [f"CONVERSATION:\n{record['prompt'].strip()}\n"]
    for label, a in zip(labels, shown):
        parts.append(f"[ANSWER {label}]\n{a['answer']}\n[END OF ANSWER {label}]\n")
    if pair_order is not None:
        parts.append("PAIRWISE ORDER: " + ", ".join(f"({a}, {b})" for a, b in pair_order))
    if tiebreak is not None:
        parts.append("TIEBREAK ORDER: " + " > ".join(tiebreak))
    parts.append("\nYOUR EVALUATION:")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]
    return RankingRequest(index=index, variant=variant, k=k, permutation=permutation, answers=shown,
                          messages=messages, pair_order=pair_order, tiebreak_order=tiebreak)


# ----------------------------------------------------------------------------------------------
# Parsing

PARSE_ERRORS = {
    "no_ranking": "no ranking list found",
    "not_letters": "the ranking holds something other than answer letters",
    "unknown_letters": "letters outside the K answers",
    "duplicate_letters": "a letter appears more than once",
    "missing_letters": "not every answer is ranked",
}


class RankingParseError(ValueError):
    """The judge's output holds no valid ranking: `.kind` is a PARSE_ERRORS key."""

    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {PARSE_ERRORS[kind]} ({detail})")


# [['C', 'A']] as asked, or [('C', 'A')]; then, as a fallback, a flat ['C', 'A'] (GPT-4 wrote that
# form in about 190 of the authors' outputs).
_NESTED = re.compile(r"\[\s*[\[(]([^\[\]()]*)[\])]\s*\]")
_FLAT = re.compile(r"\[([^\[\]()]*)\]")
# Last resort: a line ending in bare comma-separated letters, "Final ranking: E, D, A, F, G, C, B."
# (about 30 of the authors' outputs; their own parser accepted this form too).
_BARE = re.compile(r"(?:^|[:\s])([A-Za-z](?:[ \t]*,[ \t]*[A-Za-z])+)[ \t]*\.?[ \t]*$", re.M)
_LETTER = re.compile(r"""^["']?\s*(?:(?:model|answer|assistant|response)\s+)?([A-Za-z])\s*["']?$""", re.I)


def _tokens(content: str) -> list[str]:
    tokens = [t.strip() for t in content.split(",")]
    if tokens and tokens[-1] == "":  # a trailing comma
        tokens.pop()
    return tokens


def parse_ranking(text: str | None, k: int) -> list[int]:
    """Display positions best first from the judge's output, e.g. "... [['C', 'A', 'B']]" -> [2, 0, 1].

    The last `[[...]]` (or `[(...)]`) in the text is the ranking; without one, the last flat list
    `['C', 'A', ...]` whose items all look like letters; without that, the last line that ends in
    bare comma-separated letters ("Final ranking: C, A, B."). Items may be quoted or bare, lower or
    upper case, and may read "Model C". The ranking must hold each of the K letters exactly once; otherwise
    RankingParseError says which rule it broke, quoting the list.
    """
    labels = letters(k)
    if not text or not text.strip():
        raise RankingParseError("no_ranking", "empty output")
    nested = _NESTED.findall(text)
    if nested:
        content = nested[-1]
    else:
        flat = [c for c in _FLAT.findall(text) if len(_tokens(c)) >= 2 and all(_LETTER.match(t) for t in _tokens(c))]
        bare = _BARE.findall(text)
        if not (flat or bare):
            tail = text.strip()[-120:].replace("\n", " ")
            raise RankingParseError("no_ranking", f"output ends {tail!r}")
        content = flat[-1] if flat else bare[-1]
    tokens = _tokens(content)
    shown = f"[[{content.strip()[:120]}]]"
    bad = [t for t in tokens if not _LETTER.match(t)]
    if bad or not tokens:
        raise RankingParseError("not_letters", f"{bad[:3] if bad else 'empty list'} in {shown}")
    found = [_LETTER.match(t).group(1).upper() for t in tokens]
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise RankingParseError("unknown_letters", f"{', '.join(unknown)} with K={k} (A-{labels[-1]}) in {shown}")
    dup = sorted(x for x, n in Counter(found).items() if n > 1)
    if dup:
        raise RankingParseError("duplicate_letters", f"{', '.join(dup)} repeated in {shown}")
    missing = [x for x in labels if x not in found]
    if missing:
        raise RankingParseError("missing_letters", f"{', '.join(missing)} not ranked in {shown}")
    return [labels.index(x) for x in found]


# ----------------------------------------------------------------------------------------------
# Judges

class Judge(Protocol):
    """Anything that answers RankingRequests: OpenAIJudge, simulated_judge.SimulatedJudge, a test double.

    `complete` raises llm_client.RequestError when one request fails for good (the runner records
    it and goes on) and llm_client.ClientError when the judge cannot be used at all (the run stops).
    """

    name: str

    def cache_identity(self) -> dict: ...

    def complete(self, request: RankingRequest) -> ChatReply: ...


class OpenAIJudge:
    """A ranking judge behind an OpenAI-compatible chat endpoint: each request's messages go to
    `client` (by default an llm_client.ChatClient configured from the environment)."""

    def __init__(self, client: ChatClient | None = None):
        self.client = client or ChatClient()
        self.name = self.client.config.model

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.client!r})"

    def cache_identity(self) -> dict:
        return self.client.cache_identity()

    def complete(self, request: RankingRequest) -> ChatReply:
        return self.client.complete_messages(request.messages)


# ----------------------------------------------------------------------------------------------
# Cache and runner

# The reply cache (a JsonlCache) holds one record per request: key (`request_key`), index, variant,
# and the reply's text, model and token counts.
CACHE_KEY_FIELDS = ("key",)


def request_key(request: RankingRequest, identity: Mapping) -> str:
    """Cache key: a hash of the messages and whatever else decides the judge's reply.

    The full SHA-256 of the sorted JSON, not jsonl_cache.content_hash: the keys of existing reply
    caches stay valid.
    """
    blob = json.dumps({"judge": dict(identity), "messages": request.messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class RatingReport:
    """What a `rate_dataset` call did."""

    variant: str
    judge: str
    path: str
    num_prompts: int = 0                 # prompts in the output file
    num_ranked: int = 0                  # with a valid ranking
    num_cached: int = 0                  # replies taken from the cache (no request made)
    parse_errors: Counter = field(default_factory=Counter)    # PARSE_ERRORS kind -> count
    request_errors: Counter = field(default_factory=Counter)  # failure kind -> count
    examples: list = field(default_factory=list)              # the first few failures, in full
    prompt_tokens: int = 0               # spent in this call
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0        # saved by the cache
    cached_completion_tokens: int = 0
    retries: int = 0

    def __str__(self) -> str:
        lines = [f"{self.judge} / {self.variant}: {self.num_ranked} of {self.num_prompts} prompts ranked "
                 f"({self.num_cached} from cache) -> {self.path}",
                 f"  tokens this call: {self.prompt_tokens} prompt + {self.completion_tokens} completion; "
                 f"saved by the cache: {self.cached_prompt_tokens} + {self.cached_completion_tokens}; "
                 f"retried attempts: {self.retries}"]
        for kind, n in self.parse_errors.most_common():
            lines.append(f"  unparsable output ({kind}): {n}")
        for kind, n in self.request_errors.most_common():
            lines.append(f"  failed request ({kind}): {n}")
        lines += [f"    e.g. {e}" for e in self.examples]
        return "\n".join(lines)


def rate_dataset(records: Iterable[Mapping], judge: Judge, variant: str, out_path: str | os.PathLike, *,
                 seed: int = 0, k: int | None = None, limit: int | None = None,
                 cache_path: str | os.PathLike | None = None, progress: bool = True,
                 max_consecutive_failures: int = 5) -> RatingReport:
    """Rate Nectar-schema records with `judge` and write `out_path` in the rating-experiment schema.

    Each output row has the schema's fields (prompt, answers in display order, rating_text,
    ranking_order, model_ranking, k) plus index, variant, judge, permutation (display position
    -> index in the record's answers), pair_order, tiebreak_order, parse_error, request_error,
    token counts and whether the reply came from the cache. A row whose output cannot be parsed
    has ranking_order null and a parse_error; a request that failed for good has rating_text null
    and a request_error (and is not cached, so a rerun asks again). After
    `max_consecutive_failures` failed requests in a row the run stops with ClientError (the service
    is down), writing the rows so far; finished replies are in the cache either way. Rows stream to
    `<out_path>.tmp`, which replaces `out_path` when the run ends; an interrupted run leaves
    `out_path` as it was.
    """
    from tqdm.auto import tqdm

    cache = JsonlCache(cache_path, CACHE_KEY_FIELDS) if cache_path else None
    identity = judge.cache_identity()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    report = RatingReport(variant=variant, judge=judge.name, path=str(out_path))
    total = len(records) if hasattr(records, "__len__") else None
    if limit:
        records = itertools.islice(records, limit)
        total = min(total, limit) if total is not None else limit
    streak = 0
    with open(tmp_path, "w", encoding="utf-8") as out:
        for index, record in enumerate(tqdm(records, total=total, desc=f"rating ({variant})", disable=not progress)):
            row, failure = _rate_one(record, index, judge, variant, identity, cache, report, seed=seed, k=k)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.num_prompts += 1
            streak = streak + 1 if failure else 0
            if failure and streak >= max_consecutive_failures:
                out.close()
                os.replace(tmp_path, out_path)
                where = f" in {cache.path}" if cache is not None else ""
                raise ClientError(f"{streak} requests in a row failed (last, prompt {index}: {failure}); stopping. "
                                  f"Finished replies are cached{where}; rerun to resume.")
    os.replace(tmp_path, out_path)
    if report.parse_errors or report.request_errors:
        warnings.warn(str(report), stacklevel=2)
    return report


def _rate_one(record: Mapping, index: int, judge: Judge, variant: str, identity: Mapping,
              cache: JsonlCache | None, report: RatingReport, seed: int, k: int | None):
    """One output row, and the request error if the request failed (None otherwise)."""
    request = build_request(record, variant, index=index, seed=seed, k=k)
    row = {"index": index, "prompt": record["prompt"], "answers": request.answers, "rating_text": None,
           "ranking_order": None, "model_ranking": None, "k": request.k, "variant": variant,
           "judge": judge.name, "permutation": request.permutation,
           "pair_order": [list(p) for p in request.pair_order] if request.pair_order else None,
           "tiebreak_order": request.tiebreak_order, "parse_error": None, "request_error": None,
           "prompt_tokens": 0, "completion_tokens": 0, "cached": False}
    key = request_key(request, identity)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        reply = ChatReply(hit["text"], hit["model"], hit["prompt_tokens"], hit["completion_tokens"])
        row["cached"] = True
        report.num_cached += 1
        report.cached_prompt_tokens += reply.prompt_tokens
        report.cached_completion_tokens += reply.completion_tokens
    else:
        try:
            reply = judge.complete(request)
        except RequestError as e:
            row["request_error"] = str(e)
            report.request_errors[e.kind] += 1
            _add_example(report, f"prompt {index}: request failed: {e}")
            return row, e
        report.retries += reply.retries
        report.prompt_tokens += reply.prompt_tokens
        report.completion_tokens += reply.completion_tokens
        if cache is not None:
            # Only the reply is stored, never anything of the request's credentials.
            cache.put({"key": key, "index": index, "variant": variant, "text": reply.text, "model": reply.model,
                       "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens})
    row.update(rating_text=reply.text, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
    _add_ranking(row, reply.text, request, report)
    return row, None


def _add_ranking(row: dict, text: str, request: RankingRequest, report: RatingReport) -> None:
    """Parse the judge's output into `row` (ranking_order, model_ranking) or record why it failed."""
    try:
        order = parse_ranking(text, request.k)
    except RankingParseError as e:
        row["parse_error"] = str(e)
        report.parse_errors[e.kind] += 1
        end = text.strip()[-160:].replace("\n", " ")
        tail = "" if e.kind == "no_ranking" else f"; output ends {end!r}"
        _add_example(report, f"prompt {request.index}: {e}{tail}")
    else:
        row["ranking_order"] = order
        row["model_ranking"] = [request.answers[p].get("model") for p in order]
        report.num_ranked += 1


def _add_example(report: RatingReport, example: str, most: int = 5) -> None:
    """Keep the first `most` failures of a run in full for the report."""
    if len(report.examples) < most:
        report.examples.append(example)
