"""The simulated ranking judge: answers judge.RankingRequests offline, with a known truth and a
positional bias we set.

Notebook 02 uses it to show how positional bias arises and what it does to the labels, and the
tests use it to run the rating pipeline (judge.rate_dataset) without an endpoint. It models
Plackett-Luce over known answer utilities plus a bonus for early display positions when ranking
all K answers at once, and Bradley-Terry pairwise comparisons with a bonus for the first answer of
a pair (see `SimulatedJudge` for exactly what it models and what not). Its output has the shape
of a real judge's and goes through the same parser. It is this project's addition: the Starling
authors measured GPT-4 only.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from starling_lib.judge import RankingRequest
from starling_lib.llm_client import ChatReply


@dataclass
class SimulatedJudgeConfig:
    """Knobs of the simulated judge (utilities and biases are in logits)."""

    position_bonus: float = 1.5        # extra utility of the answer shown first in a K-wise list
    bonus_decay: float = 0.6           # the bonus at display position i is position_bonus * bonus_decay**i
    pair_first_bonus: float = 0.3      # extra utility of the answer shown first within a pair
    utility_spread: float = 3.0        # utility gap between the best (rank 1) and worst (rank K) answer
    tie_margin: float = 0.3            # a pairwise comparison closer than this is called a tie
    malformed_rate: float = 0.0        # share of outputs whose final ranking drops a letter (tests failure handling)
    seed: int = 0                      # seed of the judge's noise
    name: str = "simulated-judge"      # reported as the judge's model name


class SimulatedJudge:
    """An offline judge with a known truth and a tunable positional bias.

    Each shown answer has a true utility u from its `rank` field (rank 1 gets `utility_spread`,
    rank K gets 0, evenly spaced). What it models:
      * ranking all K at once (no_pairwise): Plackett-Luce over u + b(position) with
        b(i) = position_bonus * bonus_decay**i, sampled with the Gumbel-max trick;
      * pairwise variants: each pair, in the request's PAIRWISE ORDER (or A-B, A-C, ... when the
        judge chooses), is a Bradley-Terry comparison of u_first + pair_first_bonus against
        u_second with logistic noise; a margin under `tie_margin` is a tie. The final ranking is by
        wins. With a TIEBREAK ORDER, a tied pair goes to the answer earlier in that order and so do
        tied win counts; without one a tied pair is half a win each and tied win counts fall back
        to the judge's K-wise impression (u + b(position) + Gumbel noise), which is where the
        K-wise positional bias leaks back in.
    What it does not model: the order in which pairs are compared has no effect (comparisons are
    independent), so pairwise_no_given_order, pairwise_not_random and baseline_no_tiebreak are the
    same judge here; the judge always complies with the procedure; its noise does not depend on
    the prompt. The output text has the same shape as a real judge's and goes through the same
    parser; token counts are estimates at 4 characters per token.
    """

    def __init__(self, config: SimulatedJudgeConfig | None = None):
        self.config = config or SimulatedJudgeConfig()
        self.name = self.config.name

    def cache_identity(self) -> dict:
        """Everything that decides the reply besides the request: the whole config."""
        return {"model": self.name, **asdict(self.config)}

    def utilities(self, request: RankingRequest) -> np.ndarray:
        """True utilities of the shown answers from their `rank`: utility_spread for rank 1 down to 0 for rank K."""
        k = request.k
        ranks = [a.get("rank") for a in request.answers]
        if any(not isinstance(r, (int, float)) for r in ranks):
            raise ValueError(f"prompt {request.index}: the simulated judge needs a numeric `rank` on every answer")
        return self.config.utility_spread * (k - np.asarray(ranks, dtype=float)) / (k - 1)

    def complete(self, request: RankingRequest) -> ChatReply:
        """The judge's reply to `request`: the same for the same request, config and seed."""
        cfg, k, labels = self.config, request.k, request.letters
        rng = np.random.default_rng([cfg.seed, request.index, zlib.crc32(request.variant.encode())])
        u = self.utilities(request)
        impression = u + cfg.position_bonus * cfg.bonus_decay ** np.arange(k) + rng.gumbel(size=k)
        lines = ["This is a good natured conversation.", ""]
        if request.variant == "no_pairwise":
            order = list(np.argsort(-impression, kind="stable"))
        else:
            order, comparisons = self._pairwise(request, u, impression, rng)
            lines += comparisons + [""]
        ranking = [labels[p] for p in order]
        if cfg.malformed_rate and rng.random() < cfg.malformed_rate:
            ranking = ranking[:-1]
        lines.append("Final ranking: [[" + ", ".join(f"'{x}'" for x in ranking) + "]]")
        text = "\n".join(lines)
        chars = sum(len(m["content"]) for m in request.messages)
        return ChatReply(text=text, model=self.name, prompt_tokens=chars // 4, completion_tokens=len(text) // 4)

    def _pairwise(self, request: RankingRequest, u: np.ndarray, impression: np.ndarray,
                  rng: np.random.Generator) -> tuple[list[int], list[str]]:
        """(display positions ranked by pairwise wins, one output line per comparison)."""
        cfg, labels = self.config, request.letters
        pairs = request.pair_order or list(itertools.combinations(labels, 2))
        tiebreak = request.tiebreak_order
        wins, lines = np.zeros(request.k), []
        for a, b in pairs:
            i, j = labels.index(a), labels.index(b)
            margin = u[i] + cfg.pair_first_bonus - u[j] + rng.logistic()
            if abs(margin) < cfg.tie_margin:
                if tiebreak is None:
                    wins[i] += 0.5
                    wins[j] += 0.5
                    lines.append(f"('{a}', '{b}'): tie")
                    continue
                winner = i if tiebreak.index(a) < tiebreak.index(b) else j
            else:
                winner = i if margin > 0 else j
            wins[winner] += 1
            lines.append(f"('{a}', '{b}'): {labels[winner]}")
        second = [tiebreak.index(x) for x in labels] if tiebreak is not None else list(-impression)
        return sorted(range(request.k), key=lambda p: (-wins[p], second[p])), lines
