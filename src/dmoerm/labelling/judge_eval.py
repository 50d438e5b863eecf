"""An LLM judge as a zero-shot reward model: ``dmoerm eval-judge`` (issue 5's baseline (d)).

:func:`judge_rewards` turns the judge's both-orders verdicts on :data:`~dmoerm.labelling.prompts.OVERALL` into
per-response rewards; :func:`run_judge_eval` (configured by :class:`JudgeEvalConfig`) scores them with the
metrics and report of ``dmoerm eval``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.config import JudgeConfig
from dmoerm.labelling.judge import CONSISTENCY, Judge, combine_orders
from dmoerm.labelling.pairs import LabelPair, judge_pairs
from dmoerm.labelling.prompts import OVERALL

logger = logging.getLogger(__name__)


def judge_rewards(
    judge: Judge,
    records: Sequence[PreferenceRecord],
    *,
    consistency: str = "auto",
    min_margin: float = 0.0,
    language: str = "auto",
    progress: bool = True,
) -> list[list[float]]:
    """An LLM judge as a zero-shot reward: per response, the sum over its record's pairs of the judge's
    both-orders verdict on :data:`OVERALL` (issue 5's baseline (d)).

    With logit margins (``consistency`` ``margin``, or ``auto`` when the judge has them) a pair adds
    ``s = (margin_ab - margin_ba) / 2`` (the log-odds that the first response is better with a constant position
    bias cancelled; ``|s| < min_margin`` adds 0) to the first response and ``-s`` to the second; otherwise the
    paper's strict rule adds +1 / -1 when both orders name the same winner and 0 when they do not (a tie,
    which the metrics exclude and count). Returns ``rewards[i][j]`` for ``records[i].responses[j]``.
    """
    from tqdm.auto import tqdm

    rewards = [[0.0] * len(rec.responses) for rec in records]
    pairs = [
        LabelPair(
            rec.conversation, rec.responses[i], rec.responses[j], rec.category, rec.source, f"{k}:{i}:{j}"
        )
        for k, rec in enumerate(records)
        for i in range(len(rec.responses))
        for j in range(i + 1, len(rec.responses))
    ]
    bar = tqdm(total=len(pairs), unit="pair", desc="judge", disable=not progress, dynamic_ncols=True)

    async def run() -> None:
        try:
            async for res in judge_pairs(pairs, lambda pair: (None, (OVERALL,)), judge, language):
                bar.update(1)
                k, i, j = (int(x) for x in res.pair.uid.split(":"))
                v_ab, v_ba = res.ab[0], res.ba[0]
                has_margins = v_ab.margin is not None and v_ba.margin is not None
                if consistency == "margin" or (consistency == "auto" and has_margins):
                    d = combine_orders(v_ab, v_ba, "margin", min_margin)
                    s = (v_ab.margin - v_ba.margin) / 2.0 if d.winner is not None else 0.0
                else:
                    d = combine_orders(v_ab, v_ba, "strict")
                    s = {"a": 1.0, "b": -1.0}.get(d.winner or "", 0.0)
                rewards[k][i] += s
                rewards[k][j] -= s
        finally:
            await judge.aclose()

    try:
        asyncio.run(run())
    finally:
        bar.close()
    return rewards


@dataclass
class JudgeEvalConfig(JudgeConfig):
    """``dmoerm eval-judge``: an LLM judge's agreement with human labels, by the same metrics and report as
    ``dmoerm eval`` (the judge options of :class:`~dmoerm.labelling.config.JudgeConfig` plus the data)."""

    data: list[str] = field(default_factory=list)
    """Bundled source names or JSONL files in the documented schema (e.g. a run's ``splits/test.jsonl``)."""
    out: str | None = None
    """Folder for ``eval.json`` and ``eval.md`` (and the judge cache, unless ``cache`` is set)."""
    taxonomy: str = "default"
    """Taxonomy that maps the data's category labels onto categories (per-category rows)."""
    limit: int | None = None
    """Records per data source at most (the first ones); None for all."""
    n_resamples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    system: str | None = None
    """Row label in comparison tables; None uses ``LLM judge (<judge name>)``."""
    consistency: str = "auto"
    """How the two orders combine: ``margin`` (logit margins), ``strict`` (the paper's agreement rule) or
    ``auto`` (margins when the judge has them)."""

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency: {self.consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("data: name at least one source (e.g. rmb/pairwise) or JSONL file")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: {self.limit} must be >= 1, or None for all records")
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples: {self.n_resamples} must be >= 0 (0 skips the intervals)")
        super().__post_init__()

    def cache_path(self) -> str:
        """``cache``, else ``<out>/judge_cache.sqlite``, else an in-memory cache."""
        if self.cache:
            return self.cache
        return str(Path(self.out) / "judge_cache.sqlite") if self.out else ":memory:"


def run_judge_eval(config: JudgeEvalConfig):
    """Load the data, ask the judge about every pair in both orders, compute the metrics of ``dmoerm eval``
    (:func:`~dmoerm.evaluation.compute_metrics`), write ``eval.json``/``eval.md`` to ``config.out``."""
    from dmoerm.evaluation import Throughput, compute_metrics, load_eval_records, write_eval
    from dmoerm.labelling.config import make_judge
    from dmoerm.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(config.taxonomy)
    records = load_eval_records(config.data, taxonomy, config.data_dir, limit=config.limit)
    judge = make_judge(config)
    t0 = time.perf_counter()
    rewards = judge_rewards(
        judge,
        records,
        consistency=config.consistency,
        min_margin=config.min_margin,
        language=config.language,
        progress=config.progress,
    )
    seconds = time.perf_counter() - t0
    result = compute_metrics(
        rewards, records, n_resamples=config.n_resamples, system=config.system or f"LLM judge ({judge.name})"
    )
    n_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in records)
    result.throughput = Throughput(
        seconds=seconds,
        responses_per_second=sum(len(r.responses) for r in records) / max(seconds, 1e-9),
        pairs_per_second=n_pairs / max(seconds, 1e-9),
        batch_size=getattr(judge, "batch_size", 1),
    )
    result.meta = {"judge": judge.identity, "data": list(config.data), "consistency": config.consistency}
    if config.out:
        write_eval(result, config.out)
    a = result.overall.agreement
    logger.info(
        "judge %s: agreement %.4f [%.4f, %.4f] on %d pairs", judge.name, a.value, a.ci_low, a.ci_high, a.n
    )
    return result
