"""Label response pairs per capability point with a judge, into the CapabilityLabel JSONL file phase 2 reads.

:func:`label_pairs` asks the judge about every (pair, capability point of the pair's category) in both
orders, combines the orders (:func:`~dmoerm.labelling.judge.combine_orders`) and appends each kept label to
the output file as soon as its pair is done (one ``write`` per line, flushed and fsynced per batch). It is
resumable: labels already in the file are not asked again, a half-written last line left by a kill is cut
off, and the judge cache answers every question that was asked before, so a rerun (or a run restarted
after ``kill -9``) ends with the same labels and no duplicates.

:class:`Labeller` (and :func:`label_records`) label given records with the judge a :class:`LabelJudgeConfig`
describes: the entry for code that has its records already (the training pipeline).
:class:`LabelConfig` and :func:`run_label` are the ``dmoerm label`` command's configuration and entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmoerm.data import Message, PreferenceRecord
from dmoerm.labelling.config import JudgeConfig, _bad, make_judge
from dmoerm.labelling.judge import CONSISTENCY, Judge, JudgeStats, PositionBias, combine_orders
from dmoerm.labelling.pairs import LabelPair, PairResult, iter_pairs, judge_pairs, pair_key, resolve_category
from dmoerm.labelling.prompts import LANGUAGES
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import Capability, Category, Taxonomy

__all__ = [
    "LabelConfig",
    "LabelJudgeConfig",
    "LabelStats",
    "Labeller",
    "label_pairs",
    "label_records",
    "load_records",
    "run_label",
]

logger = logging.getLogger(__name__)


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


def _check_label_args(
    taxonomy: Taxonomy, consistency: str, language: str, default_category: str | None
) -> None:
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency: {consistency!r} is not one of {', '.join(CONSISTENCY)}")
    if language != "auto" and language not in LANGUAGES:
        raise ValueError(f"language: {language!r} is not one of auto, {', '.join(LANGUAGES)}")
    if default_category is not None and default_category not in {c.name for c in taxonomy.categories}:
        raise ValueError(
            f"default_category: {default_category!r} is not a category of taxonomy {taxonomy.name!r}"
        )


class _LabelRun:
    """One :func:`label_pairs` call: which labels are in the file, the counters, the progress bar."""

    def __init__(self, taxonomy: Taxonomy, judge: Judge, done: set, bar, *, only: set[str] | None,
                 default_category: str | None, consistency: str, min_margin: float):  # fmt: skip
        self.taxonomy, self.judge, self.done, self.bar = taxonomy, judge, done, bar
        self.only, self.default_category = only, default_category
        self.consistency, self.min_margin = consistency, min_margin
        self.stats = LabelStats()
        self.bias = PositionBias()
        self.winners: Counter = Counter()
        self.methods: Counter = Counter()
        self.seen: set[str] = set()
        self.judge_before = judge.stats.copy()

    def plan(self, pair: LabelPair) -> tuple[Category, tuple[Capability, ...]] | None:
        """The pair's category and the capability points still to ask; None skips the pair (counted)."""
        self.stats.pairs += 1
        key = pair.key
        if key in self.seen:
            self.stats.pairs_duplicate += 1
            self.bar.update(1)
            return None
        self.seen.add(key)
        cat = resolve_category(self.taxonomy, pair, self.default_category)
        if cat is None:
            self.stats.pairs_no_category += 1
            self.bar.update(1)
            return None
        caps = tuple(c for c in cat.capabilities if self.only is None or c.name in self.only)
        todo = tuple(c for c in caps if (self.judge.name, key, c.name) not in self.done)
        if not todo:
            if caps:
                self.stats.pairs_done_before += 1
            self.bar.update(1)
            return None
        return cat, todo

    def label_lines(self, res: PairResult) -> list[str]:
        """Combine both orders per capability point; the JSONL lines of the kept labels not yet in the file."""
        stats, pair, lines = self.stats, res.pair, []
        for cap, v_ab, v_ba in zip(res.capabilities, res.ab, res.ba, strict=True):
            stats.questions += 1
            self.bias.add(v_ab, v_ba)
            d = combine_orders(v_ab, v_ba, self.consistency, self.min_margin)
            self.methods[d.method] += 1
            if d.winner is None:
                attr = _DROP_COUNTER[d.reason]
                setattr(stats, attr, getattr(stats, attr) + 1)
                continue
            stats.kept += 1
            self.winners[d.winner] += 1
            dkey = (self.judge.name, pair.key, cap.name)
            if dkey in self.done:
                continue
            label = CapabilityLabel(
                conversation=pair.conversation,
                response_a=pair.response_a,
                response_b=pair.response_b,
                capability=cap.name,
                winner=d.winner,
                confidence=round(d.confidence, 6),
                category=pair.category,
                judge=self.judge.name,
                raw=json.dumps({"ab": v_ab.raw, "ba": v_ba.raw, "method": d.method}, ensure_ascii=False),
            )
            lines.append(json.dumps(label.to_json(), ensure_ascii=False) + "\n")
            self.done.add(dkey)
        return lines

    async def run(self, pairs: Iterable[LabelPair], out_path: Path, language: str) -> None:
        """Judge the pairs; append each pair's labels as soon as it is done (flushed and fsynced)."""
        with out_path.open("a", encoding="utf-8") as f:
            try:
                async for res in judge_pairs(pairs, self.plan, self.judge, language):
                    self.stats.pairs_judged += 1
                    lines = self.label_lines(res)
                    if lines:
                        f.write(
                            "".join(lines)
                        )  # whole lines in one write: a kill leaves at most one cut line
                        f.flush()
                        os.fsync(f.fileno())
                        self.stats.written += len(lines)
                    self.bar.update(1)
                    js = self.judge.stats.minus(self.judge_before)
                    self.bar.set_postfix(
                        kept=self.stats.kept,
                        asked=js.asked,
                        cached=js.cached,
                        retries=sum(js.retries.values()),
                    )
            finally:
                await self.judge.aclose()

    def finish(self, elapsed_s: float) -> LabelStats:
        stats = self.stats
        stats.elapsed_s = elapsed_s
        stats.pairs_per_s = stats.pairs_judged / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        stats.add_judge_stats(self.judge.stats.minus(self.judge_before))
        stats.winners = dict(self.winners)
        stats.methods = dict(self.methods)
        stats.position_bias = self.bias.to_dict()
        logger.info("labelling stats: %s", json.dumps(stats.to_dict()))
        return stats


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
    _check_label_args(taxonomy, consistency, language, default_category)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_path)
    if total is None and isinstance(items, (list, tuple)):
        total = sum(_n_pairs(x, max_pairs_per_record) for x in items)
    t0 = time.perf_counter()
    bar = _progress(total, progress)
    run = _LabelRun(taxonomy, judge, done, bar, only=set(capabilities) if capabilities is not None else None,
                    default_category=default_category, consistency=consistency, min_margin=min_margin)  # fmt: skip
    try:
        asyncio.run(run.run(iter_pairs(items, max_pairs_per_record), out_path, language))
    finally:
        bar.close()
        stats = run.finish(time.perf_counter() - t0)
    return stats


# ------------------------------------------------------------------------------------------------ config


@dataclass(kw_only=True)
class LabelJudgeConfig(JudgeConfig):
    """What labelling records with a judge needs: the judge options of
    :class:`~dmoerm.labelling.config.JudgeConfig` plus the rule that combines the two orders. The pipeline's
    ``labels.judge`` section is one of these (:class:`Labeller` takes it); :class:`LabelConfig` adds the data
    and the output file of ``dmoerm label``."""

    consistency: str = "auto"
    """``strict`` (keep only when both orders agree), ``margin`` (sign of the margin difference, cancels a
    constant position bias; needs logits), ``auto`` (margin when available)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.consistency not in CONSISTENCY:
            _bad("consistency", f"{self.consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if self.consistency == "margin" and self.backend == "openai" and not self.logprobs:
            _bad("consistency", "margin needs logit margins: set logprobs=True or use strict/auto")
        if self.consistency == "margin" and self.mode == "json":
            _bad("consistency", "json mode answers have no margins; use strict or auto")


@dataclass(kw_only=True)
class LabelConfig(LabelJudgeConfig):
    """Configuration of ``dmoerm label`` (and :func:`run_label`): the judge options of :class:`LabelJudgeConfig`
    plus what to label and where. Every field is validated on creation (``ValueError`` naming the field)."""

    data: list[str]
    """Preference data to label: bundled source names (``pandalm/test``, ``llmbar``, ...) or files, as
    :func:`dmoerm.data.load_source` accepts them."""
    out: str
    """Output CapabilityLabel JSONL file (appended to; a rerun resumes)."""
    taxonomy: str = "default"
    """Taxonomy name or YAML/JSON file (:func:`dmoerm.taxonomy.load_taxonomy`)."""
    limit: int | None = None
    """Records per data source at most; None for all."""
    default_category: str | None = None
    """Category for records whose category is unknown or unmapped; None skips them."""
    capabilities: list[str] | None = None
    """Label only these capability points; None for all."""
    stats_out: str | None = None
    """Where to write the run's statistics as JSON; None means ``<out>.stats.json``."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            _bad("data", "no data; name at least one source (e.g. pandalm/test) or file")
        if not self.out:
            _bad("out", "empty; give the output JSONL path")
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            _bad("limit", f"{self.limit} must be >= 1 (or None for all)")
        if self.capabilities is not None and not self.capabilities:
            _bad("capabilities", "empty list; name at least one capability point or leave it unset for all")

    def cache_path(self) -> str:
        """``cache``, or ``<out>.cache.sqlite`` beside the label file."""
        return self.cache or str(Path(self.out).with_suffix(Path(self.out).suffix + ".cache.sqlite"))


# ------------------------------------------------------------------------------------------------ entries


class Labeller:
    """Labels records with the judge a :class:`LabelJudgeConfig` describes, built on first use and kept for
    every later call (one model load, one SQLite cache, however many label files).

    Example (what the pipeline does per category)::

        labeller = Labeller(LabelJudgeConfig(backend="openai", model="gpt-4o-mini", cache="c.sqlite"), taxonomy)
        stats = labeller.label(records, "labels/code.jsonl", max_pairs_per_record=1)
    """

    def __init__(self, config: LabelJudgeConfig, taxonomy: Taxonomy, *, progress: bool | None = None):
        if not isinstance(config, LabelJudgeConfig):
            raise TypeError(f"config: expected a LabelJudgeConfig, got {type(config).__name__}")
        self.config = config
        self.taxonomy = taxonomy
        self.progress = config.progress if progress is None else progress
        self._judge: Judge | None = None

    @property
    def judge(self) -> Judge:
        """The judge (:func:`~dmoerm.labelling.config.make_judge`), built on first access."""
        if self._judge is None:
            self._judge = make_judge(self.config)
        return self._judge

    def label(
        self,
        records: Iterable[PreferenceRecord | LabelPair],
        out: str | Path,
        *,
        capabilities: Sequence[str] | None = None,
        default_category: str | None = None,
        max_pairs_per_record: int | None = None,
        total: int | None = None,
    ) -> LabelStats:
        """:func:`label_pairs` with this judge and the configuration's consistency rule, margin and language."""
        return label_pairs(
            records,
            self.taxonomy,
            self.judge,
            out,
            consistency=self.config.consistency,
            min_margin=self.config.min_margin,
            language=self.config.language,
            capabilities=capabilities,
            default_category=default_category,
            max_pairs_per_record=max_pairs_per_record,
            progress=self.progress,
            total=total,
        )


def label_records(
    config: LabelJudgeConfig,
    records: Iterable[PreferenceRecord | LabelPair],
    taxonomy: Taxonomy,
    out: str | Path,
    **kwargs,
) -> LabelStats:
    """Label ``records`` into ``out`` with the judge ``config`` describes (one call of :meth:`Labeller.label`;
    ``kwargs`` are its options)."""
    return Labeller(config, taxonomy).label(records, out, **kwargs)


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
    labeller = Labeller(cfg, taxonomy)
    logger.info("labelling %d records with %s into %s", len(records), labeller.judge.name, cfg.out)
    stats = labeller.label(
        records, cfg.out, capabilities=cfg.capabilities, default_category=cfg.default_category
    )
    stats_path = Path(cfg.stats_out or str(cfg.out) + ".stats.json")
    tmp = stats_path.with_suffix(stats_path.suffix + ".tmp")
    tmp.write_text(json.dumps({"config": _public_config(cfg), "stats": stats.to_dict()}, indent=2) + "\n")
    tmp.replace(stats_path)
    return stats


def _public_config(cfg: LabelConfig) -> dict:
    """The configuration as JSON (it names the key's environment variable, never the key)."""
    return asdict(cfg)
