"""Label response pairs per capability point with a judge, into the CapabilityLabel JSONL file phase 2 reads.

:func:`label_pairs` asks the judge about every (pair, capability point of the pair's category) in both
orders, combines the orders (:func:`~dmoerm.labelling.judge.combine_orders`) and appends each kept label to
the output file as soon as its pair is done (one ``write`` per line, flushed and fsynced per batch). It is
resumable: labels already in the file are not asked again, a half-written last line left by a kill is cut
off, and the judge cache answers every question that was asked before, so a rerun (or a run restarted
after ``kill -9``) ends with the same labels and no duplicates.

:class:`LabelConfig` and :func:`run_label` are the ``dmoerm label`` command's configuration and entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from dmoerm.data import Message, PreferenceRecord
from dmoerm.labelling.judge import (
    CONSISTENCY,
    Judge,
    JudgeRequest,
    JudgeStats,
    PositionBias,
    Verdict,
    combine_orders,
)
from dmoerm.labelling.prompts import LANGUAGES, detect_language
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import Capability, Category, Taxonomy

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ pairs


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


# ------------------------------------------------------------------------------------------------ output


def _read_done(path: Path) -> set[tuple[str, str, str]]:
    """(judge, pair key, capability) of every label in ``path``; cuts off a half-written last line."""
    done: set[tuple[str, str, str]] = set()
    if not path.exists():
        return done
    good_end = 0
    with path.open("rb") as f:
        data = f.read()
    pos = 0
    for raw_line in data.splitlines(keepends=True):
        end = pos + len(raw_line)
        if raw_line.endswith(b"\n"):
            line = raw_line.strip()
            if line:
                try:
                    obj = json.loads(line)
                    conv = [Message(m["role"], m["content"]) for m in obj["conversation"]]
                    key = pair_key(conv, obj["response_a"], obj["response_b"], obj.get("category"))
                    done.add((obj.get("judge", ""), key, obj["capability"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}: line at byte {pos} is not a capability label ({e})") from None
            good_end = end
        pos = end
    if good_end < len(data):
        logger.warning("%s: cutting off a half-written last line (%d bytes)", path, len(data) - good_end)
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


@dataclass
class LabelStats:
    """What a labelling run did."""

    pairs: int = 0
    """Pairs read from the input."""
    pairs_done_before: int = 0
    """Pairs whose labels were all in the output file already (not asked again)."""
    pairs_no_category: int = 0
    """Pairs skipped: no taxonomy category for their label and no default category."""
    pairs_duplicate: int = 0
    """Pairs skipped: the same pair appeared earlier in the input."""
    pairs_judged: int = 0
    questions: int = 0
    """(pair, capability point) questions combined from both orders this run."""
    kept: int = 0
    """Labels kept (and written, unless already in the file)."""
    written: int = 0
    dropped_inconsistent: int = 0
    """Strict mode: the two orders named different responses."""
    dropped_low_margin: int = 0
    """Margin mode: the calibrated margin was below ``min_margin``."""
    malformed: int = 0
    """Questions dropped because an answer stayed unparseable after its retries."""
    failed: int = 0
    """Questions dropped because a request failed after its retries (asked again on the next run)."""
    asked: int = 0
    """Prompts the backend answered this run (one per order and capability point, or per order in JSON mode)."""
    cached: int = 0
    """Prompts served from the cache."""
    retries: dict = field(default_factory=dict)
    """Retries by kind: rate_limit, server_error, timeout, connection, malformed."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    elapsed_s: float = 0.0
    pairs_per_s: float = 0.0
    """Judged pairs per second of wall time."""
    winners: dict = field(default_factory=dict)
    """Kept labels by winner (a, b, tie)."""
    methods: dict = field(default_factory=dict)
    """Decisions by rule (strict, margin)."""
    position_bias: dict = field(default_factory=dict)
    """first_position_share, order_disagreement, mean_position1_margin (see :class:`PositionBias`)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def add_judge_stats(self, js: JudgeStats) -> None:
        self.asked, self.cached = js.asked, js.cached
        self.retries = dict(sorted(js.retries.items()))
        self.prompt_tokens, self.completion_tokens, self.cost = (
            js.prompt_tokens,
            js.completion_tokens,
            js.cost,
        )


_DROP_COUNTER = {
    "inconsistent": "dropped_inconsistent",
    "low_margin": "dropped_low_margin",
    "malformed": "malformed",
    "failed": "failed",
}


def _n_pairs(item: PreferenceRecord | LabelPair, cap: int | None) -> int:
    if isinstance(item, LabelPair):
        return 1
    n = len(item.responses) * (len(item.responses) - 1) // 2
    return n if cap is None else min(n, cap)


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pair", desc="labelling", disable=not enabled, dynamic_ncols=True)


def label_pairs(
    items: Iterable[PreferenceRecord | LabelPair],
    taxonomy: Taxonomy,
    judge: Judge,
    out_path: str | Path,
    *,
    consistency: str = "auto",
    min_margin: float = 0.0,
    language: str = "auto",
    capabilities: Sequence[str] | None = None,
    default_category: str | None = None,
    max_pairs_per_record: int | None = None,
    progress: bool = True,
    total: int | None = None,
) -> LabelStats:
    """Label every pair per capability point of its category; append kept labels to ``out_path`` (JSONL).

    Args:
        items: preference records (every response pair of each) or :class:`LabelPair` s.
        taxonomy: categories and capability points; a pair's category is resolved by
            :func:`resolve_category`.
        judge: an :class:`~dmoerm.labelling.api.OpenAIJudge` or :class:`~dmoerm.labelling.local.LocalJudge`.
        out_path: the label file; existing labels are kept and not asked again (resume).
        consistency: ``strict`` (paper), ``margin`` or ``auto`` (see :func:`combine_orders`).
        min_margin: margin mode drops labels whose calibrated log-odds are below this.
        language: ``auto`` (from the conversation's script), ``en`` or ``zh``.
        capabilities: only these capability points (names); None for all of each category.
        default_category: category for pairs with no resolvable category; None skips them.
        max_pairs_per_record: cap on pairs taken from a record with more than two responses.
        progress: show a tqdm progress bar (with ETA when ``total`` is known or ``items`` has a length).
        total: number of pairs, for the ETA.

    Returns:
        :class:`LabelStats`; it is also logged.
    """
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency: {consistency!r} is not one of {', '.join(CONSISTENCY)}")
    if language != "auto" and language not in LANGUAGES:
        raise ValueError(f"language: {language!r} is not one of auto, {', '.join(LANGUAGES)}")
    if default_category is not None and default_category not in {c.name for c in taxonomy.categories}:
        raise ValueError(
            f"default_category: {default_category!r} is not a category of taxonomy {taxonomy.name!r}"
        )
    only = set(capabilities) if capabilities is not None else None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_path)
    stats = LabelStats()
    bias = PositionBias()
    winners: Counter = Counter()
    methods: Counter = Counter()
    seen: set[str] = set()
    judge_before = judge.stats.copy()
    if total is None and isinstance(items, (list, tuple)):
        total = sum(_n_pairs(x, max_pairs_per_record) for x in items)

    def plan(pair: LabelPair):
        stats.pairs += 1
        key = pair.key
        if key in seen:
            stats.pairs_duplicate += 1
            bar.update(1)
            return None
        seen.add(key)
        cat = resolve_category(taxonomy, pair, default_category)
        if cat is None:
            stats.pairs_no_category += 1
            bar.update(1)
            return None
        caps = tuple(c for c in cat.capabilities if only is None or c.name in only)
        todo = tuple(c for c in caps if (judge.name, key, c.name) not in done)
        if not todo:
            if caps:
                stats.pairs_done_before += 1
            bar.update(1)
            return None
        return cat, todo

    t0 = time.perf_counter()
    bar = _progress(total, progress)

    async def main() -> None:
        with out_path.open("a", encoding="utf-8") as f:
            try:
                async for res in judge_pairs(iter_pairs(items, max_pairs_per_record), plan, judge, language):
                    stats.pairs_judged += 1
                    lines = []
                    for cap, v_ab, v_ba in zip(res.capabilities, res.ab, res.ba, strict=True):
                        stats.questions += 1
                        bias.add(v_ab, v_ba)
                        d = combine_orders(v_ab, v_ba, consistency, min_margin)
                        methods[d.method] += 1
                        if d.winner is None:
                            attr = _DROP_COUNTER[d.reason]
                            setattr(stats, attr, getattr(stats, attr) + 1)
                            continue
                        stats.kept += 1
                        winners[d.winner] += 1
                        pair = res.pair
                        dkey = (judge.name, pair.key, cap.name)
                        if dkey in done:
                            continue
                        label = CapabilityLabel(
                            conversation=pair.conversation,
                            response_a=pair.response_a,
                            response_b=pair.response_b,
                            capability=cap.name,
                            winner=d.winner,
                            confidence=round(d.confidence, 6),
                            category=pair.category,
                            judge=judge.name,
                            raw=json.dumps(
                                {"ab": v_ab.raw, "ba": v_ba.raw, "method": d.method}, ensure_ascii=False
                            ),
                        )
                        lines.append(json.dumps(label.to_json(), ensure_ascii=False) + "\n")
                        done.add(dkey)
                    if lines:
                        f.write(
                            "".join(lines)
                        )  # whole lines in one write: a kill leaves at most one cut line
                        f.flush()
                        os.fsync(f.fileno())
                        stats.written += len(lines)
                    bar.update(1)
                    js = judge.stats.minus(judge_before)
                    bar.set_postfix(
                        kept=stats.kept, asked=js.asked, cached=js.cached, retries=sum(js.retries.values())
                    )
            finally:
                await judge.aclose()

    try:
        asyncio.run(main())
    finally:
        bar.close()
        stats.elapsed_s = time.perf_counter() - t0
        stats.pairs_per_s = stats.pairs_judged / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        stats.add_judge_stats(judge.stats.minus(judge_before))
        stats.winners = dict(winners)
        stats.methods = dict(methods)
        stats.position_bias = bias.to_dict()
        logger.info("labelling stats: %s", json.dumps(stats.to_dict()))
    return stats


# ------------------------------------------------------------------------------------------------ config


BACKENDS = ("local", "openai")


@dataclass(kw_only=True)
class JudgeConfig:
    """The judge options that ``dmoerm label`` (:class:`LabelConfig`) and ``dmoerm label-quality``
    (:class:`~dmoerm.labelling.quality.QualityConfig`) share; :func:`make_judge` builds the judge from them.

    Every field is validated on creation; a bad value raises ``ValueError("<field>: <what is wrong>; <fix>")``.
    """

    backend: str = "local"
    """``local`` (a Hugging Face causal LM, logits) or ``openai`` (any OpenAI-compatible API)."""
    model: str | None = None
    """Local: folder/hub id, None for the bundled SmolLM2-135M-Instruct. API: the served model name."""
    base_url: str = "https://api.openai.com/v1"
    """API root of an OpenAI-compatible server (vLLM ``http://127.0.0.1:8000/v1``, Ollama ``.../11434/v1``)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never configured)."""
    mode: str = "pairwise"
    """``pairwise``: one question per capability point and order (paper). ``json``: all points of the category
    in one call per order with a JSON answer (API backend only)."""
    min_margin: float = 0.0
    """Margin rule: drop labels whose calibrated log-odds are below this."""
    language: str = "auto"
    """Prompt language: ``auto`` (from the conversation's script), ``en`` or ``zh``."""
    cache: str | None = None
    """SQLite judge cache; None for the command's default path (beside its output)."""
    concurrency: int = 8
    """API: requests in flight at most."""
    requests_per_second: float | None = None
    """API: request starts per second at most; None for no limit."""
    timeout_s: float = 60.0
    """API: per-request timeout in seconds."""
    max_retries: int = 6
    """API: retries per request for 429, 5xx, timeouts and connection errors."""
    backoff_base_s: float = 1.0
    """API: first backoff in seconds (doubles per retry up to ``backoff_max_s``, with jitter; a
    ``Retry-After`` header wins)."""
    backoff_max_s: float = 60.0
    """API: longest backoff in seconds."""
    malformed_retries: int = 2
    """API: re-asks of an unparseable answer before it is counted as malformed and skipped."""
    temperature: float = 0.0
    """API: sampling temperature."""
    logprobs: bool = False
    """API: request top log-probabilities of the answer token (enables margin calibration)."""
    price_prompt_per_m: float = 0.0
    """API: price per 1M prompt tokens, for the reported cost."""
    price_completion_per_m: float = 0.0
    """API: price per 1M completion tokens."""
    device: str = "cpu"
    """Local: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    dtype: str = "bfloat16"
    """Local: ``float32``, ``bfloat16``, ``float16``."""
    batch_size: int = 8
    """Local: rows per forward pass."""
    reuse_prefix: bool = True
    """Local: reuse the key/value cache of the shared prefix across capability questions."""
    max_length: int = 4096
    """Local: token limit of one prompt; longer prompts lose tokens from the middle."""
    answer_labels: str = "12"
    """How positions are named in prompts: ``12`` ("1"/"2") or ``AB`` ("A"/"B")."""
    progress: bool = True
    """Show a progress bar with ETA."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        if self.backend not in BACKENDS:
            bad("backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "openai" and not self.model:
            bad("model", "the openai backend needs the served model name (e.g. gpt-4o-mini, deepseek-chat)")
        if not self.base_url.startswith(("http://", "https://")):
            bad("base_url", f"{self.base_url!r} must start with http:// or https://")
        if self.mode not in ("pairwise", "json"):
            bad("mode", f"{self.mode!r} is not one of pairwise, json")
        if self.mode == "json" and self.backend != "openai":
            bad("mode", "json mode needs backend=openai; the local judge reads logits per capability point")
        if self.min_margin < 0:
            bad("min_margin", f"{self.min_margin} must be >= 0")
        if self.language not in ("auto", *LANGUAGES):
            bad("language", f"{self.language!r} is not one of auto, {', '.join(LANGUAGES)}")
        if self.cache is not None and not str(self.cache).strip():
            bad("cache", "empty; give a SQLite file path or leave it unset for the default")
        if self.concurrency < 1:
            bad("concurrency", f"{self.concurrency} must be >= 1")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            bad("requests_per_second", f"{self.requests_per_second} must be > 0 (or None for no limit)")
        if self.timeout_s <= 0:
            bad("timeout_s", f"{self.timeout_s} must be > 0")
        for name in ("max_retries", "malformed_retries"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if self.backoff_base_s < 0:
            bad("backoff_base_s", f"{self.backoff_base_s} must be >= 0")
        if self.backoff_max_s < self.backoff_base_s:
            bad("backoff_max_s", f"{self.backoff_max_s} must be >= backoff_base_s ({self.backoff_base_s})")
        if self.temperature < 0:
            bad("temperature", f"{self.temperature} must be >= 0")
        for name in ("price_prompt_per_m", "price_completion_per_m"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if not (self.device in ("cpu", "cuda", "auto", "mps") or self.device.startswith("cuda:")):
            bad("device", f"{self.device!r} is not one of cpu, cuda, cuda:N, mps, auto")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad("dtype", f"{self.dtype!r} is not one of float32, bfloat16, float16")
        if self.batch_size < 1:
            bad("batch_size", f"{self.batch_size} must be >= 1")
        if self.max_length < 64:
            bad("max_length", f"{self.max_length} is too small for a judge prompt; use 1024 or more")
        if self.answer_labels not in ("12", "AB"):
            bad("answer_labels", f"{self.answer_labels!r} is not one of 12, AB")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            bad(
                "api_key_env",
                f"{self.api_key_env!r} must be the NAME of an environment variable, not the key",
            )

    @classmethod
    def from_namespace(cls, ns: object):
        """From an ``argparse.Namespace`` (attributes named like the fields; missing or None ones take
        defaults)."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        given = {k: v for k, v in vars(ns).items() if k in names and (v is not None or k in required)}
        return cls(**given)

    def cache_path(self) -> str:
        """The judge cache file (subclasses give the default)."""
        if self.cache is None:
            raise ValueError("cache: no judge cache path configured")
        return self.cache


@dataclass(kw_only=True)
class LabelConfig(JudgeConfig):
    """Configuration of ``dmoerm label`` (and :func:`run_label`): the judge options of :class:`JudgeConfig`
    plus what to label and where. Every field is validated on creation (``ValueError`` naming the field)."""

    data: list[str]
    """Preference data to label: bundled source names (``pandalm/test``, ``llmbar``, ...) or files, as
    :func:`dmoerm.data.load_source` accepts them."""
    out: str
    """Output CapabilityLabel JSONL file (appended to; a rerun resumes)."""
    taxonomy: str = "default"
    """Taxonomy name or YAML/JSON file (:func:`dmoerm.taxonomy.load_taxonomy`)."""
    consistency: str = "auto"
    """``strict`` (keep only when both orders agree), ``margin`` (sign of the margin difference, cancels a
    constant position bias; needs logits), ``auto`` (margin when available)."""
    limit: int | None = None
    """Records per data source at most; None for all."""
    default_category: str | None = None
    """Category for records whose category is unknown or unmapped; None skips them."""
    capabilities: list[str] | None = None
    """Label only these capability points; None for all."""
    stats_out: str | None = None
    """Where to write the run's statistics as JSON; None means ``<out>.stats.json``."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            bad("data", "no data; name at least one source (e.g. pandalm/test) or file")
        if not self.out:
            bad("out", "empty; give the output JSONL path")
        super().__post_init__()
        if self.consistency not in CONSISTENCY:
            bad("consistency", f"{self.consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if self.consistency == "margin" and self.backend == "openai" and not self.logprobs:
            bad("consistency", "margin needs logit margins: set logprobs=True or use strict/auto")
        if self.consistency == "margin" and self.mode == "json":
            bad("consistency", "json mode answers have no margins; use strict or auto")
        if self.limit is not None and self.limit < 1:
            bad("limit", f"{self.limit} must be >= 1 (or None for all)")
        if self.capabilities is not None and not self.capabilities:
            bad("capabilities", "empty list; name at least one capability point or leave it unset for all")

    def cache_path(self) -> str:
        """``cache``, or ``<out>.cache.sqlite`` beside the label file."""
        return self.cache or str(Path(self.out).with_suffix(Path(self.out).suffix + ".cache.sqlite"))


def make_judge(cfg: JudgeConfig) -> Judge:
    """The judge (with its SQLite cache at ``cfg.cache_path()``) that a configuration describes.

    Nothing is loaded here: a local judge loads its model on first use, an API judge opens its connections on
    its first request. The API key is read from ``$<api_key_env>`` when requests are sent.
    """
    from dmoerm.labelling.cache import JudgeCache
    from dmoerm.labelling.prompts import PromptBuilder

    cache = JudgeCache(cfg.cache_path())
    labels = (cfg.answer_labels[0], cfg.answer_labels[1])
    if cfg.backend == "openai":
        from dmoerm.labelling.api import OpenAIJudge

        return OpenAIJudge(
            cfg.model or "",
            cfg.base_url,
            api_key_env=cfg.api_key_env,
            mode=cfg.mode,
            cache=cache,
            concurrency=cfg.concurrency,
            requests_per_second=cfg.requests_per_second,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            malformed_retries=cfg.malformed_retries,
            temperature=cfg.temperature,
            logprobs=cfg.logprobs,
            price_prompt_per_m=cfg.price_prompt_per_m,
            price_completion_per_m=cfg.price_completion_per_m,
            prompts=PromptBuilder(labels=labels),
        )
    from dmoerm.labelling.local import LocalJudge

    return LocalJudge(
        cfg.model,
        cache=cache,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        reuse_prefix=cfg.reuse_prefix,
        max_length=cfg.max_length,
        prompts=PromptBuilder(labels=labels, max_chars_response=4000, max_chars_conversation=6000),
    )


def load_records(names: Sequence[str], limit: int | None = None) -> list[PreferenceRecord]:
    """Records from bundled sources or JSONL files (:func:`dmoerm.data.load_data`)."""
    from dmoerm.data import load_data

    records: list[PreferenceRecord] = []
    for name in names:
        records += list(load_data(name, limit=limit))
    return records


def run_label(config: LabelConfig | object) -> LabelStats:
    """The ``dmoerm label`` command: load data and taxonomy, build the judge, label, write the stats JSON.

    ``config`` is a :class:`LabelConfig` or an ``argparse.Namespace`` with the same attribute names.
    """
    cfg = config if isinstance(config, LabelConfig) else LabelConfig.from_namespace(config)
    from dmoerm.taxonomy import load_taxonomy  # type: ignore[attr-defined]

    taxonomy = load_taxonomy(cfg.taxonomy)
    records = load_records(cfg.data, cfg.limit)
    judge = make_judge(cfg)
    logger.info("labelling %d records with %s into %s", len(records), judge.name, cfg.out)
    stats = label_pairs(
        records,
        taxonomy,
        judge,
        cfg.out,
        consistency=cfg.consistency,
        min_margin=cfg.min_margin,
        language=cfg.language,
        capabilities=cfg.capabilities,
        default_category=cfg.default_category,
        progress=cfg.progress,
    )
    stats_path = Path(cfg.stats_out or str(cfg.out) + ".stats.json")
    tmp = stats_path.with_suffix(stats_path.suffix + ".tmp")
    tmp.write_text(json.dumps({"config": _public_config(cfg), "stats": stats.to_dict()}, indent=2) + "\n")
    tmp.replace(stats_path)
    return stats


def _public_config(cfg: LabelConfig) -> dict:
    """The configuration as JSON (it names the key's environment variable, never the key)."""
    return asdict(cfg)
