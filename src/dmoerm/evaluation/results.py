"""Result types of an evaluation and their files (``eval.json`` / ``eval.md``).

An :class:`EvalResult` holds the overall row and one :class:`CategoryMetrics` per category, each with its
:class:`Estimate` values (a share and its bootstrap interval) and :class:`LengthMetrics`. ``to_dict`` / ``from_dict``
round-trip through strict JSON (NaN becomes null); :func:`write_eval` and :func:`load_eval` write and read the
files every command and report share.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

UNCATEGORIZED = "uncategorized"
"""Category label of records with no category (neither in the record nor in the given category list)."""

ALL = "all"
"""Category label of the overall row."""


@dataclass
class Estimate:
    """A share with its bootstrap confidence interval."""

    value: float
    """The point estimate in [0, 1]; NaN when ``n`` is 0."""
    ci_low: float
    """Lower end of the percentile bootstrap interval (NaN when not computed)."""
    ci_high: float
    """Upper end of the percentile bootstrap interval (NaN when not computed)."""
    n: int
    """How many units the share is over: pairs for agreements, records for best-of-n accuracy."""
    n_records: int
    """How many records those units come from (the bootstrap resamples records)."""

    @classmethod
    def empty(cls) -> Estimate:
        return cls(math.nan, math.nan, math.nan, 0, 0)


@dataclass
class LengthMetrics:
    """How much a set of rewards (or the human labels) is explained by response length."""

    longer_wins_baseline: Estimate
    """Agreement of the "longer response wins" rule on the same pairs (equal lengths count half)."""
    when_shorter_better: Estimate
    """Reward agreement on the pairs whose human-better response is the shorter one."""
    when_longer_better: Estimate
    """Reward agreement on the pairs whose human-better response is the longer one."""
    equal_length_pairs: int
    """Pairs left out of both length-controlled agreements because both responses have the same length."""
    pearson_chars: float
    """Pearson correlation of reward with response length in characters, over all responses."""
    spearman_chars: float
    """Spearman correlation of reward with response length in characters, over all responses."""
    pearson_chars_within_prompt: float
    """Pearson correlation after subtracting each record's mean reward and mean length (prompt effects removed)."""
    pearson_tokens: float | None = None
    """As ``pearson_chars`` with token counts, when token lengths were given."""
    spearman_tokens: float | None = None
    """As ``spearman_chars`` with token counts, when token lengths were given."""


@dataclass
class CategoryMetrics:
    """All metrics for one category (or for all records, category ``"all"``)."""

    category: str
    n_records: int
    n_responses: int
    agreement: Estimate
    """Pairwise agreement with the human ranking; ``n`` is the number of untied human pairs."""
    human_ties_excluded: int
    """Response pairs the humans ranked equal, left out of every agreement."""
    best_of_n: Estimate | None
    """Best-of-n accuracy over records with at least 3 responses, None when there are none."""
    length: LengthMetrics


@dataclass
class Throughput:
    """Scoring speed measured around ``Scorer.score`` with ``time.perf_counter``."""

    seconds: float
    responses_per_second: float
    pairs_per_second: float
    batch_size: int


@dataclass
class EvalResult:
    """An evaluation of one system on one set of preference records."""

    overall: CategoryMetrics
    per_category: list[CategoryMetrics]
    n_resamples: int
    confidence: float
    seed: int
    category_source: str = "record"
    """Where the categories came from: ``record``, ``given`` (a per-record list) or ``scorer`` (the router)."""
    throughput: Throughput | None = None
    """Set by :func:`evaluate`; None when the rewards were computed elsewhere."""
    system: str = ""
    """A name for the system, used as the row label in :func:`comparison_table`."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form information (data set, checkpoint, ...), written to eval.json as is."""

    def category(self, name: str) -> CategoryMetrics:
        """The metrics of one category (``"all"`` for the overall row)."""
        if name == ALL:
            return self.overall
        for row in self.per_category:
            if row.category == name:
                return row
        raise KeyError(f"category {name!r} not in this result; have {', '.join(self.categories)}")

    @property
    def categories(self) -> list[str]:
        return [row.category for row in self.per_category]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN becomes None."""
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (no NaN literals)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict`."""
        tp = d.get("throughput")
        return cls(
            overall=_category_from_dict(d["overall"]),
            per_category=[_category_from_dict(c) for c in d["per_category"]],
            n_resamples=int(d["n_resamples"]),
            confidence=float(d["confidence"]),
            seed=int(d["seed"]),
            category_source=d.get("category_source", "record"),
            throughput=Throughput(**tp) if tp else None,
            system=d.get("system", ""),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        """Markdown report: the agreement table with length controls, best-of-n, correlations, throughput."""
        from dmoerm.evaluation.tables import _result_markdown  # tables import these types

        return _result_markdown(self)


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _estimate_from_dict(d: Mapping[str, Any] | None) -> Estimate | None:
    if d is None:
        return None
    return Estimate(_num(d["value"]), _num(d["ci_low"]), _num(d["ci_high"]), int(d["n"]), int(d["n_records"]))


def _category_from_dict(d: Mapping[str, Any]) -> CategoryMetrics:
    ln = d["length"]
    length = LengthMetrics(
        longer_wins_baseline=_estimate_from_dict(ln["longer_wins_baseline"]),
        when_shorter_better=_estimate_from_dict(ln["when_shorter_better"]),
        when_longer_better=_estimate_from_dict(ln["when_longer_better"]),
        equal_length_pairs=int(ln["equal_length_pairs"]),
        pearson_chars=_num(ln["pearson_chars"]),
        spearman_chars=_num(ln["spearman_chars"]),
        pearson_chars_within_prompt=_num(ln["pearson_chars_within_prompt"]),
        pearson_tokens=None if ln.get("pearson_tokens") is None else float(ln["pearson_tokens"]),
        spearman_tokens=None if ln.get("spearman_tokens") is None else float(ln["spearman_tokens"]),
    )
    return CategoryMetrics(
        category=d["category"],
        n_records=int(d["n_records"]),
        n_responses=int(d["n_responses"]),
        agreement=_estimate_from_dict(d["agreement"]),
        human_ties_excluded=int(d["human_ties_excluded"]),
        best_of_n=_estimate_from_dict(d.get("best_of_n")),
        length=length,
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return None if not math.isfinite(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def write_eval(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (created if missing); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "eval.json"
    md_path = out / "eval.md"
    json_path.write_text(result.to_json() + "\n", encoding="utf-8")
    md_path.write_text(result.to_markdown(), encoding="utf-8")
    logger.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


def load_eval(path: str | Path) -> EvalResult:
    """Read an ``eval.json`` (or the folder holding one) written by :func:`write_eval`."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    return EvalResult.from_json(p.read_text(encoding="utf-8"))
