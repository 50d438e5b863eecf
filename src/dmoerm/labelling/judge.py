"""The judge interface, the two-order (position-swapped) protocol, and its consistency rules.

A :class:`Judge` answers :class:`JudgeRequest` s. One request is *one order*: a conversation, the response in
position 1, the response in position 2, a category and capability points. The answer is one
:class:`Verdict` per capability point: which position is better, the probability that position 1 is better,
the log-odds margin where the backend has one, and the raw answer.

The paper's protocol (DMoERM, section 3.2) asks every question twice with the positions swapped and keeps a
label only when both orders agree: :func:`combine_orders` with ``method="strict"``. With logit margins
(local judges, or API judges that return logprobs), ``method="margin"`` decides by the sign of
``margin(a first) - margin(b first)``, which cancels a constant preference for one position.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from dmoerm.data import Message
from dmoerm.labelling.prompts import TIE, PromptBuilder
from dmoerm.taxonomy import Capability, Category

CONSISTENCY = ("auto", "strict", "margin")
"""How the two orders combine: ``strict`` (paper: both argmaxes agree), ``margin`` (sign of the margin
difference), ``auto`` (margin where both verdicts carry margins, strict otherwise)."""


class JudgeError(RuntimeError):
    """A judge failed for a reason retries cannot fix (bad URL, 401, model missing)."""


@dataclass(frozen=True)
class JudgeRequest:
    """One ordered comparison: which of ``first`` and ``second`` is better on each capability point."""

    conversation: tuple[Message, ...]
    first: str
    """The response shown in position 1."""
    second: str
    """The response shown in position 2."""
    category: Category | None
    capabilities: tuple[Capability, ...]
    language: str = "en"
    """Prompt language, ``en`` or ``zh``."""


@dataclass(frozen=True)
class Verdict:
    """A judge's answer about one capability point for one order."""

    capability: str
    choice: str | None
    """``"1"`` (position 1 better), ``"2"``, ``"tie"``, or None when the answer was malformed or failed."""
    p_first: float | None = None
    """Probability that position 1 is better (hard answers give 1.0 / 0.0 / 0.5)."""
    margin: float | None = None
    """Log-odds that position 1 is better (logit(1) - logit(2)); None when the backend has no logits."""
    raw: str = ""
    """The raw answer (text, or the answer-token log-probabilities of a local judge)."""
    cached: bool = False
    """Served from the judge cache."""
    error: str | None = None
    """Why ``choice`` is None: ``malformed`` or ``failed: ...``."""


@dataclass
class JudgeStats:
    """Counters a judge keeps across calls (a run reads the difference before/after)."""

    asked: int = 0
    """Questions answered by the backend (HTTP calls or local forward rows), retries not counted."""
    cached: int = 0
    """Questions served from the cache (or, ``shared`` of them, by an identical question in flight)."""
    malformed: int = 0
    """Questions whose answer stayed unparseable after every retry."""
    failed: int = 0
    """Questions that failed after every retry (transport errors, 5xx, 429)."""
    retries: Counter = field(default_factory=Counter)
    """Retries by kind: ``rate_limit`` (429), ``server_error`` (5xx), ``timeout``, ``connection``, ``malformed``."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    """In the currency of the configured prices (per 1M tokens)."""
    shared: int = 0
    """Of ``cached``: questions answered by an identical question that was in flight (asked once)."""

    def copy(self) -> JudgeStats:
        return JudgeStats(
            self.asked,
            self.cached,
            self.malformed,
            self.failed,
            Counter(self.retries),
            self.prompt_tokens,
            self.completion_tokens,
            self.cost,
            self.shared,
        )

    def minus(self, before: JudgeStats) -> JudgeStats:
        retries = Counter(self.retries)
        retries.subtract(before.retries)
        return JudgeStats(
            self.asked - before.asked,
            self.cached - before.cached,
            self.malformed - before.malformed,
            self.failed - before.failed,
            +retries,
            self.prompt_tokens - before.prompt_tokens,
            self.completion_tokens - before.completion_tokens,
            self.cost - before.cost,
            self.shared - before.shared,
        )


class Judge(ABC):
    """A pairwise capability judge. Subclasses: :class:`~dmoerm.labelling.api.OpenAIJudge` (any
    OpenAI-compatible chat-completions server) and :class:`~dmoerm.labelling.local.LocalJudge` (a Hugging Face
    causal LM read through its answer-token logits)."""

    name: str
    """Short name written into each label's ``judge`` field, e.g. ``openai:gpt-4o-mini``."""
    prompts: PromptBuilder
    stats: JudgeStats
    supports_json: bool = False
    """Whether :attr:`mode` ``json`` (all capability points in one call) is available."""
    mode: str = "pairwise"
    """``pairwise`` (one question per capability point) or ``json`` (one question per ordered pair)."""
    pairs_per_call: int = 1
    """How many pairs the labelling loop hands over in one :meth:`judge` call (local judges batch)."""
    max_inflight_calls: int = 1
    """How many :meth:`judge` calls the labelling loop keeps running at once (API judges overlap)."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Backend + model + every parameter that changes answers; keys the cache. Never holds secrets."""

    @abstractmethod
    async def judge(self, requests: Sequence[JudgeRequest]) -> list[list[Verdict]]:
        """One list of verdicts per request, one verdict per capability point, in the request's order."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default does nothing."""

    def judge_sync(self, requests: Sequence[JudgeRequest]) -> list[list[Verdict]]:
        """:meth:`judge` from synchronous code."""
        import asyncio

        async def _run() -> list[list[Verdict]]:
            try:
                return await self.judge(requests)
            finally:
                await self.aclose()

        return asyncio.run(_run())


@dataclass(frozen=True)
class Decision:
    """The combination of both orders for one (pair, capability point)."""

    winner: str | None
    """``a``, ``b``, ``tie`` or None (dropped)."""
    confidence: float
    reason: str
    """``agree``, ``margin``, ``inconsistent``, ``low_margin``, ``malformed`` or ``failed``."""
    method: str
    """``strict`` or ``margin``: the rule that decided."""


def _p_a(v_ab: Verdict, v_ba: Verdict) -> tuple[float, float]:
    """P(a better) as seen by each order."""
    p1 = v_ab.p_first if v_ab.p_first is not None else _hard_p(v_ab.choice)
    p2 = v_ba.p_first if v_ba.p_first is not None else _hard_p(v_ba.choice)
    return p1, 1.0 - p2


def _hard_p(choice: str | None) -> float:
    return {"1": 1.0, "2": 0.0}.get(choice or "", 0.5)


def _winner_of(choice: str | None, a_first: bool) -> str | None:
    if choice == TIE:
        return "tie"
    if choice not in ("1", "2"):
        return None
    return ("a" if choice == "1" else "b") if a_first else ("b" if choice == "1" else "a")


def combine_orders(v_ab: Verdict, v_ba: Verdict, method: str = "auto", min_margin: float = 0.0) -> Decision:
    """Combine the verdict with ``a`` in position 1 (``v_ab``) and with ``b`` in position 1 (``v_ba``).

    * ``strict`` (the paper): keep the label only when both orders name the same response (or both say tie);
      confidence = mean of the two orders' probabilities for the agreed winner.
    * ``margin``: s = (margin_ab - margin_ba) / 2 is the log-odds that ``a`` is better with a constant
      position bias cancelled; winner = sign(s), confidence = sigmoid(|s|); ``|s| < min_margin`` is dropped.
    * ``auto``: ``margin`` when both verdicts have margins, else ``strict``.
    """
    if method not in CONSISTENCY:
        raise ValueError(f"method: {method!r} is not one of {', '.join(CONSISTENCY)}")
    for v in (v_ab, v_ba):
        if v.error is not None and v.error.startswith("failed"):
            return Decision(None, 0.0, "failed", "strict")
    if v_ab.choice is None or v_ba.choice is None:
        return Decision(None, 0.0, "malformed", "strict")
    if method == "auto":
        method = "margin" if v_ab.margin is not None and v_ba.margin is not None else "strict"
    if method == "margin":
        if v_ab.margin is None or v_ba.margin is None:
            raise ValueError("method: 'margin' needs logit margins from both orders; use 'strict' or 'auto'")
        s = (v_ab.margin - v_ba.margin) / 2.0
        conf = 1.0 / (1.0 + math.exp(-abs(s)))
        if abs(s) < min_margin or s == 0.0:
            return Decision(None, conf, "low_margin", "margin")
        return Decision("a" if s > 0 else "b", conf, "margin", "margin")
    w1, w2 = _winner_of(v_ab.choice, True), _winner_of(v_ba.choice, False)
    if w1 is None or w2 is None:
        return Decision(None, 0.0, "malformed", "strict")
    if w1 != w2:
        return Decision(None, 0.0, "inconsistent", "strict")
    pa1, pa2 = _p_a(v_ab, v_ba)
    if w1 == "a":
        conf = (pa1 + pa2) / 2
    elif w1 == "b":
        conf = ((1 - pa1) + (1 - pa2)) / 2
    else:
        conf = 1.0 - (abs(pa1 - 0.5) + abs(pa2 - 0.5))  # hard ties: 1.0
    return Decision(w1, min(1.0, max(0.0, conf)), "agree", "strict")


@dataclass
class PositionBias:
    """Position-bias counters over both orders of many (pair, capability) questions."""

    answers: int = 0
    """Verdicts with a choice of position 1 or 2 (ties and malformed excluded)."""
    first: int = 0
    """Of those, how many chose position 1."""
    pairs: int = 0
    """(pair, capability) questions where both orders gave a choice."""
    disagreements: int = 0
    """Of those, how many named different responses in the two orders (a position flip)."""
    margin_sum: float = 0.0
    """Sum over both orders of the position-1 log-odds margin (where available)."""
    margin_count: int = 0

    def add(self, v_ab: Verdict, v_ba: Verdict) -> None:
        for v in (v_ab, v_ba):
            if v.choice in ("1", "2"):
                self.answers += 1
                self.first += v.choice == "1"
            if v.margin is not None:
                self.margin_sum += v.margin
                self.margin_count += 1
        w1, w2 = _winner_of(v_ab.choice, True), _winner_of(v_ba.choice, False)
        if w1 is not None and w2 is not None:
            self.pairs += 1
            self.disagreements += w1 != w2

    def merge(self, other: PositionBias) -> None:
        for f in ("answers", "first", "pairs", "disagreements", "margin_sum", "margin_count"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def to_dict(self) -> dict:
        return {
            "first_position_share": self.first / self.answers if self.answers else None,
            "order_disagreement": self.disagreements / self.pairs if self.pairs else None,
            "mean_position1_margin": self.margin_sum / self.margin_count if self.margin_count else None,
            "answers": self.answers,
            "pairs_both_orders": self.pairs,
        }
