"""Response pairs to be labelled, and the async driver that asks a judge about them in both orders.

:func:`iter_pairs` turns preference records into :class:`LabelPair` s; :func:`judge_pairs` keeps up to
``judge.max_inflight_calls`` judge calls in flight (an API judge: ``2 x concurrency`` pairs, its own
semaphore holding ``concurrency`` HTTP requests at once) and yields each pair's verdicts as they complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from dmoerm.data import Message, PreferenceRecord
from dmoerm.labelling.judge import Judge, JudgeRequest, Verdict
from dmoerm.labelling.prompts import detect_language
from dmoerm.taxonomy import Capability, Category, Taxonomy


@dataclass(frozen=True)
class LabelPair:
    """Two responses to one conversation, to be labelled per capability point."""

    conversation: tuple[Message, ...]
    response_a: str
    response_b: str
    category: str | None = None
    """A taxonomy category name or a source label (mapped through the taxonomy's mappings)."""
    source: str = ""
    uid: str = ""
    human: str | None = None
    """The human preference when known: ``a``, ``b`` or ``tie`` (for label-quality reports)."""

    @property
    def key(self) -> str:
        """A stable hash of the pair's content (conversation, both responses, category)."""
        return pair_key(self.conversation, self.response_a, self.response_b, self.category)


def pair_key(conversation: Sequence[Message], a: str, b: str, category: str | None) -> str:
    blob = json.dumps(
        [[[m.role, m.content] for m in conversation], a, b, category],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def iter_pairs(
    items: Iterable[PreferenceRecord | LabelPair], max_pairs_per_record: int | None = None
) -> Iterator[LabelPair]:
    """Pairs from records: every (i < j) pair of responses in the record's order (the human ranking becomes
    :attr:`LabelPair.human`); :class:`LabelPair` items pass through."""
    for item in items:
        if isinstance(item, LabelPair):
            yield item
            continue
        n = 0
        for i in range(len(item.responses)):
            for j in range(i + 1, len(item.responses)):
                if max_pairs_per_record is not None and n >= max_pairs_per_record:
                    break
                ri, rj = item.ranks[i], item.ranks[j]
                yield LabelPair(
                    conversation=item.conversation,
                    response_a=item.responses[i],
                    response_b=item.responses[j],
                    category=item.category,
                    source=item.source,
                    uid=f"{item.uid}#{i}-{j}" if len(item.responses) > 2 else item.uid,
                    human="a" if ri < rj else ("b" if ri > rj else "tie"),
                )
                n += 1


def resolve_category(taxonomy: Taxonomy, pair: LabelPair, default: str | None = None) -> Category | None:
    """The pair's taxonomy category: its label if that is a category name, else the label mapped through
    ``taxonomy.mappings`` for the pair's source (:meth:`Taxonomy.map_label`), else ``default``; None when
    nothing matches."""
    by_name = {c.name: c for c in taxonomy.categories}
    name = None
    if pair.category is not None:
        name = pair.category if pair.category in by_name else taxonomy.map_label(pair.source, pair.category)
    if name is None:
        name = default
    return by_name.get(name) if name else None


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class PairResult:
    """Both orders' verdicts for one pair."""

    pair: LabelPair
    category: Category | None
    capabilities: tuple[Capability, ...]
    ab: list[Verdict]
    """Verdicts with response a in position 1."""
    ba: list[Verdict]
    """Verdicts with response b in position 1."""


Plan = Callable[[LabelPair], "tuple[Category | None, tuple[Capability, ...]] | None"]


def _language(pair: LabelPair, language: str) -> str:
    if language != "auto":
        return language
    return detect_language([m.content for m in pair.conversation] + [pair.response_a, pair.response_b])


async def judge_pairs(
    pairs: Iterable[LabelPair], plan: Plan, judge: Judge, language: str = "auto"
) -> AsyncIterator[PairResult]:
    """Ask ``judge`` about each pair in both orders; yield results as they complete (not in input order).

    ``plan(pair)`` gives the category and capability points to ask about, or None to skip the pair. Up to
    ``judge.max_inflight_calls`` calls of ``judge.pairs_per_call`` pairs run at once.
    """
    per_call = max(1, judge.pairs_per_call)
    max_inflight = max(1, judge.max_inflight_calls)

    async def run(chunk: list[tuple[LabelPair, Category | None, tuple[Capability, ...]]]) -> list[PairResult]:
        reqs = []
        for pair, cat, caps in chunk:
            lang = _language(pair, language)
            reqs.append(JudgeRequest(pair.conversation, pair.response_a, pair.response_b, cat, caps, lang))
            reqs.append(JudgeRequest(pair.conversation, pair.response_b, pair.response_a, cat, caps, lang))
        verdicts = await judge.judge(reqs)
        return [
            PairResult(pair, cat, caps, verdicts[2 * i], verdicts[2 * i + 1])
            for i, (pair, cat, caps) in enumerate(chunk)
        ]

    inflight: set[asyncio.Task] = set()
    chunk: list = []
    try:
        for pair in pairs:
            planned = plan(pair)
            if planned is None:
                continue
            cat, caps = planned
            chunk.append((pair, cat, caps))
            if len(chunk) < per_call:
                continue
            inflight.add(asyncio.ensure_future(run(chunk)))
            chunk = []
            while len(inflight) >= max_inflight:
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    for r in t.result():
                        yield r
        if chunk:
            inflight.add(asyncio.ensure_future(run(chunk)))
        while inflight:
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                for r in t.result():
                    yield r
    finally:
        for t in inflight:
            t.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
