"""Metrics and reports that every reward system in the project is judged by.

Everything here works on plain rewards (one float per response of each :class:`~dmoerm.data.PreferenceRecord`),
so a single reward model, a DMoERM, an ensemble and an LLM judge are measured the same way. The pure functions
come first; :func:`evaluate` is a thin driver over the :class:`~dmoerm.outputs.Scorer` protocol.

Conventions (also in ``docs/evaluation.md``):

* **Pairwise agreement** is the share of untied human pairs (``record.pairs()``, every untied pair of a ranked
  list) where ``reward(better) > reward(worse)``. A pair the reward ties (equal floats) counts as half a
  success, so a constant scorer gets exactly 0.5. Human ties are excluded from the denominator and counted.
  Agreement is pair-weighted (a ranked list of 4 responses contributes up to 6 pairs).
* **Best-of-n accuracy** (records with at least 3 responses, e.g. RMB best-of-n sets) is the share of records
  where every human-best response scores strictly above every other response; a reward tie with a loser is a
  failure (as in RMB). Records whose responses are all tied are skipped.
* **Confidence intervals** are percentile bootstrap intervals over *records* (a cluster bootstrap: the pairs of
  one record are resampled together), with a fixed seed.
* **Length**: the "longer response wins" baseline scores each pair like a reward equal to the character length
  (equal lengths count half). Length-controlled agreement splits the pairs by whether the human-better response
  is the shorter or the longer one; pairs of equal length are excluded from both and counted.
* **Ensembles** follow Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization"): mean,
  worst case (min) and uncertainty-weighted ``mean - lam * var`` where ``var`` is the *population* variance
  over members (divide by k), as in their Eq. for UWO and their code (``np.var``); ``lam`` defaults to 0.5, the
  default of their best-of-n scripts.
* **Best-of-n** uses ``KL_bon(n) = log n - (n - 1) / n`` (Gao et al. 2022) and the unbiased estimator over all
  size-n subsets of the n_max samples (Gao et al., appendix; Coste et al.'s ``unbiased_sampler``), with proxy
  ties broken uniformly at random *in expectation* (exact, no sampling).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dmoerm.data import Message, PreferenceRecord
from dmoerm.outputs import RewardOutput, Scorer

logger = logging.getLogger(__name__)

__all__ = [
    "UNCATEGORIZED",
    "Estimate",
    "LengthMetrics",
    "CategoryMetrics",
    "Throughput",
    "EvalResult",
    "pairwise_agreement",
    "bootstrap_ci",
    "pearson",
    "spearman",
    "compute_metrics",
    "evaluate",
    "write_eval",
    "load_eval",
    "comparison_table",
    "length_table",
    "ENSEMBLE_RULES",
    "combine_rewards",
    "EnsembleRewardOutput",
    "EnsembleScorer",
    "bon_kl",
    "bon_weights",
    "bon_expected",
    "BonCurve",
    "bon_curve",
    "plot_bon_curves",
]

UNCATEGORIZED = "uncategorized"
"""Category label of records with no category (neither in the record nor in the given category list)."""

ALL = "all"
"""Category label of the overall row."""


# --------------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Pure metrics
# --------------------------------------------------------------------------------------------------------------


def _outcome(better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    """1 where better > worse, 0.5 where equal, 0 where lower."""
    return (better > worse).astype(np.float64) + 0.5 * (better == worse)


def _check_rewards(
    rewards: Sequence[Sequence[float]], records: Sequence[PreferenceRecord]
) -> list[np.ndarray]:
    if len(rewards) != len(records):
        raise ValueError(f"rewards: {len(rewards)} reward lists for {len(records)} records")
    out = []
    for i, (r, rec) in enumerate(zip(rewards, records, strict=True)):
        arr = np.asarray(r, dtype=np.float64).reshape(-1)
        if arr.shape[0] != len(rec.responses):
            raise ValueError(f"rewards[{i}]: {arr.shape[0]} rewards for {len(rec.responses)} responses")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"rewards[{i}]: not finite ({arr.tolist()}); a scorer returned NaN or inf")
        out.append(arr)
    return out


def pairwise_agreement(rewards: Sequence[Sequence[float]], records: Sequence[PreferenceRecord]) -> float:
    """Share of untied human pairs where the better response gets the higher reward (reward ties count half).

    A quick number for training loops; :func:`compute_metrics` gives the same value with CIs and breakdowns.
    Returns NaN when there is no untied pair.
    """
    arrs = _check_rewards(rewards, records)
    total, n = 0.0, 0
    for arr, rec in zip(arrs, records, strict=True):
        pairs = rec.pairs()
        if not pairs:
            continue
        b, w = np.asarray(pairs).T
        total += float(_outcome(arr[b], arr[w]).sum())
        n += len(pairs)
    return total / n if n else math.nan


def bootstrap_ci(
    sums: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk_elements: int = 4_000_000,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(sums) / sum(counts)``, resampling records with replacement.

    ``sums[r]`` is record r's total (e.g. its number of agreeing pairs) and ``counts[r]`` its number of units
    (pairs); with ``counts=None`` every record is one unit and the statistic is a plain mean. Resamples are
    drawn in chunks of at most ``chunk_elements`` indices, so memory stays bounded; 10k records x 1000
    resamples takes well under a second. Returns ``(nan, nan)`` for no records or ``n_resamples <= 0``.
    """
    s = np.asarray(sums, dtype=np.float64).reshape(-1)
    c = np.ones_like(s) if counts is None else np.asarray(counts, dtype=np.float64).reshape(-1)
    if s.shape != c.shape:
        raise ValueError(f"sums and counts differ in length: {s.shape[0]} vs {c.shape[0]}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    n = s.shape[0]
    if n == 0 or n_resamples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, chunk_elements // n)
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, n_resamples, chunk):
            b = min(chunk, n_resamples - start)
            idx = rng.integers(0, n, size=(b, n))
            stats[start : start + b] = s[idx].sum(axis=1) / c[idx].sum(axis=1)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than 2 points or either side is constant."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pearson: lengths differ ({a.shape[0]} vs {b.shape[0]})")
    if a.shape[0] < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        return math.nan
    return float(np.clip((a @ b) / den, -1.0, 1.0))


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank (scipy's ``rankdata(method="average")``)."""
    sorter = np.argsort(x, kind="mergesort")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(sorter.size)
    xs = x[sorter]
    obs = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.cumsum(obs)[inv]
    bounds = np.r_[np.nonzero(obs)[0], obs.size]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when undefined."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"spearman: lengths differ ({a.shape[0]} vs {b.shape[0]})")
    if a.shape[0] < 2:
        return math.nan
    return pearson(_rankdata(a), _rankdata(b))


@dataclass
class _Prepared:
    """Flat arrays over records, pairs and responses, built once per evaluation."""

    n_records: int
    record_category: np.ndarray  # [R] object (str)
    record_human_ties: np.ndarray  # [R] int
    record_n_responses: np.ndarray  # [R] int
    pair_record: np.ndarray  # [P] int
    pair_outcome: np.ndarray  # [P] float: 1 / 0.5 / 0
    pair_len_better: np.ndarray  # [P] int (characters)
    pair_len_worse: np.ndarray  # [P] int
    bon_record: np.ndarray  # [B] int: records with >= 3 responses and a defined best
    bon_correct: np.ndarray  # [B] float: 1 / 0
    resp_record: np.ndarray  # [M] int
    resp_reward: np.ndarray  # [M] float
    resp_chars: np.ndarray  # [M] int
    resp_tokens: np.ndarray | None  # [M] int


def _prepare(
    rewards: Sequence[Sequence[float]],
    records: Sequence[PreferenceRecord],
    categories: Sequence[str | None] | None,
    token_lengths: Sequence[Sequence[int]] | None,
    min_bon_responses: int,
) -> _Prepared:
    arrs = _check_rewards(rewards, records)
    if categories is not None and len(categories) != len(records):
        raise ValueError(f"categories: {len(categories)} categories for {len(records)} records")
    if token_lengths is not None and len(token_lengths) != len(records):
        raise ValueError(f"token_lengths: {len(token_lengths)} lists for {len(records)} records")
    n = len(records)
    cats = np.empty(n, dtype=object)
    ties = np.zeros(n, dtype=np.int64)
    nresp = np.zeros(n, dtype=np.int64)
    p_rec: list[np.ndarray] = []
    p_out: list[np.ndarray] = []
    p_lb: list[np.ndarray] = []
    p_lw: list[np.ndarray] = []
    bon_rec: list[int] = []
    bon_ok: list[float] = []
    tok: list[np.ndarray] = []
    for i, (arr, rec) in enumerate(zip(arrs, records, strict=True)):
        given = categories[i] if categories is not None else None
        cats[i] = given or rec.category or UNCATEGORIZED
        ranks = np.asarray(rec.ranks)
        m = ranks.shape[0]
        nresp[i] = m
        lengths = np.fromiter((len(r) for r in rec.responses), dtype=np.int64, count=m)
        better, worse = np.nonzero(ranks[:, None] < ranks[None, :])
        iu = np.triu_indices(m, k=1)
        ties[i] = int(np.count_nonzero(ranks[iu[0]] == ranks[iu[1]]))
        if better.size:
            p_rec.append(np.full(better.size, i, dtype=np.int64))
            p_out.append(_outcome(arr[better], arr[worse]))
            p_lb.append(lengths[better])
            p_lw.append(lengths[worse])
        if m >= min_bon_responses:
            best = ranks == ranks.min()
            if not best.all():
                bon_rec.append(i)
                bon_ok.append(float(arr[best].min() > arr[~best].max()))
        if token_lengths is not None:
            t = np.asarray(token_lengths[i], dtype=np.int64).reshape(-1)
            if t.shape[0] != m:
                raise ValueError(f"token_lengths[{i}]: {t.shape[0]} lengths for {m} responses")
            tok.append(t)

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return _Prepared(
        n_records=n,
        record_category=cats,
        record_human_ties=ties,
        record_n_responses=nresp,
        pair_record=cat(p_rec, np.int64),
        pair_outcome=cat(p_out, np.float64),
        pair_len_better=cat(p_lb, np.int64),
        pair_len_worse=cat(p_lw, np.int64),
        bon_record=np.asarray(bon_rec, dtype=np.int64),
        bon_correct=np.asarray(bon_ok, dtype=np.float64),
        resp_record=np.repeat(np.arange(n, dtype=np.int64), nresp),
        resp_reward=np.concatenate(arrs) if arrs else np.zeros(0),
        resp_chars=np.fromiter((len(r) for rec in records for r in rec.responses), dtype=np.int64),
        resp_tokens=cat(tok, np.int64) if token_lengths is not None else None,
    )


def _estimate(
    unit_record: np.ndarray,
    values: np.ndarray,
    n_records: int,
    *,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> Estimate:
    """Mean of ``values`` with a bootstrap interval over the records the units belong to."""
    if values.size == 0:
        return Estimate.empty()
    sums = np.bincount(unit_record, weights=values, minlength=n_records)
    counts = np.bincount(unit_record, minlength=n_records)
    used = counts > 0
    lo, hi = bootstrap_ci(sums[used], counts[used], n_resamples=n_resamples, seed=seed, confidence=confidence)
    return Estimate(float(values.mean()), lo, hi, int(values.size), int(used.sum()))


def _within_prompt_pearson(rec: np.ndarray, x: np.ndarray, y: np.ndarray, n_records: int) -> float:
    if x.size < 2:
        return math.nan
    counts = np.bincount(rec, minlength=n_records).astype(np.float64)
    counts[counts == 0] = 1.0
    xm = np.bincount(rec, weights=x, minlength=n_records) / counts
    ym = np.bincount(rec, weights=y.astype(np.float64), minlength=n_records) / counts
    return pearson(x - xm[rec], y - ym[rec])


def _category_metrics(
    p: _Prepared, name: str, record_mask: np.ndarray, *, n_resamples: int, seed: int, confidence: float
) -> CategoryMetrics:
    kw = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    pm = record_mask[p.pair_record]
    prec = p.pair_record[pm]
    out = p.pair_outcome[pm]
    lb = p.pair_len_better[pm]
    lw = p.pair_len_worse[pm]
    shorter = lb < lw
    longer = lb > lw
    bm = record_mask[p.bon_record] if p.bon_record.size else np.zeros(0, dtype=bool)
    rm = record_mask[p.resp_record]
    reward = p.resp_reward[rm]
    chars = p.resp_chars[rm]
    tokens = p.resp_tokens[rm] if p.resp_tokens is not None else None
    length = LengthMetrics(
        longer_wins_baseline=_estimate(prec, _outcome(lb, lw), p.n_records, **kw),
        when_shorter_better=_estimate(prec[shorter], out[shorter], p.n_records, **kw),
        when_longer_better=_estimate(prec[longer], out[longer], p.n_records, **kw),
        equal_length_pairs=int(np.count_nonzero(lb == lw)),
        pearson_chars=pearson(reward, chars),
        spearman_chars=spearman(reward, chars),
        pearson_chars_within_prompt=_within_prompt_pearson(p.resp_record[rm], reward, chars, p.n_records),
        pearson_tokens=pearson(reward, tokens) if tokens is not None else None,
        spearman_tokens=spearman(reward, tokens) if tokens is not None else None,
    )
    best_of_n = None
    if bm.any():
        best_of_n = _estimate(p.bon_record[bm], p.bon_correct[bm], p.n_records, **kw)
    return CategoryMetrics(
        category=name,
        n_records=int(record_mask.sum()),
        n_responses=int(p.record_n_responses[record_mask].sum()),
        agreement=_estimate(prec, out, p.n_records, **kw),
        human_ties_excluded=int(p.record_human_ties[record_mask].sum()),
        best_of_n=best_of_n,
        length=length,
    )


def response_token_lengths(tokenizer, records: Sequence[PreferenceRecord]) -> list[list[int]]:
    """Tokens of every response of every record (untruncated, no special tokens), for the token-length
    correlations of :func:`compute_metrics` (issue 8: length measured in the scorer's own units)."""
    return [
        [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rec.responses] for rec in records
    ]


def compute_metrics(
    rewards: Sequence[Sequence[float]],
    records: Sequence[PreferenceRecord],
    *,
    categories: Sequence[str | None] | None = None,
    token_lengths: Sequence[Sequence[int]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_bon_responses: int = 3,
    system: str = "",
) -> EvalResult:
    """All metrics of a set of rewards against the human rankings, overall and per category.

    ``rewards[i][j]`` is the reward of ``records[i].responses[j]``. ``categories`` (one per record, e.g. the
    router's choice) overrides ``record.category``; a None entry falls back to the record's own category, and
    records with neither go to ``"uncategorized"``. ``token_lengths[i][j]`` optionally adds token-length
    correlations. Every CI uses the same ``seed``. The result has no throughput (see :func:`evaluate`).
    """
    p = _prepare(rewards, records, categories, token_lengths, min_bon_responses)
    kw = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    overall = _category_metrics(p, ALL, np.ones(p.n_records, dtype=bool), **kw)
    names = sorted({str(c) for c in p.record_category})
    per_category = [_category_metrics(p, c, p.record_category == c, **kw) for c in names]
    return EvalResult(
        overall=overall,
        per_category=per_category,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        category_source="given" if categories is not None else "record",
        system=system,
    )


# --------------------------------------------------------------------------------------------------------------
# Driver over the Scorer protocol
# --------------------------------------------------------------------------------------------------------------


def evaluate(
    scorer: Scorer,
    records: Sequence[PreferenceRecord],
    batch_size: int = 16,
    categories: Sequence[str | None] | Literal["record", "scorer", "auto"] | None = None,
    *,
    token_lengths: Sequence[Sequence[int]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_bon_responses: int = 3,
    system: str = "",
    meta: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Score every response of every record with ``scorer`` in one call and compute :func:`compute_metrics`.

    ``categories``: None or ``"record"`` uses ``record.category``; a list gives one category per record;
    ``"scorer"`` uses the category the scorer reports for the record's first response
    (``RewardOutput.category``, the DMoERM router's choice); ``"auto"`` uses the record's own category and
    the scorer's where the record has none.
    Throughput is the wall time of the ``scorer.score`` call (``time.perf_counter``), including any warm-up
    the scorer does on its first batch.
    """
    records = list(records)
    conversations: list[list[Message]] = []
    responses: list[str] = []
    for rec in records:
        conv = list(rec.conversation)
        for r in rec.responses:
            conversations.append(conv)
            responses.append(r)
    n_pairs = sum(len(rec.pairs()) for rec in records)
    logger.info(
        "scoring %d responses of %d records (%d pairs), batch size %d",
        len(responses),
        len(records),
        n_pairs,
        batch_size,
    )
    start = time.perf_counter()
    outputs = scorer.score(conversations, responses, batch_size=batch_size)
    seconds = time.perf_counter() - start
    if len(outputs) != len(responses):
        raise ValueError(f"scorer returned {len(outputs)} outputs for {len(responses)} responses")
    rewards: list[list[float]] = []
    first_out: list[RewardOutput] = []
    k = 0
    for rec in records:
        m = len(rec.responses)
        rewards.append([float(o.reward) for o in outputs[k : k + m]])
        first_out.append(outputs[k])
        k += m
    source = "record"
    cats: Sequence[str | None] | None = None
    if isinstance(categories, str):
        if categories == "scorer":
            cats = [o.category for o in first_out]
            source = "scorer"
        elif categories == "auto":
            # The rule: the file's category, else the router's choice.
            cats = [rec.category or o.category for rec, o in zip(records, first_out)]
            source = "record, else scorer"
        elif categories != "record":
            raise ValueError(f"categories: use a list, 'record', 'scorer' or 'auto', got {categories!r}")
    elif categories is not None:
        cats = categories
        source = "given"
    result = compute_metrics(
        rewards,
        records,
        categories=cats,
        token_lengths=token_lengths,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        min_bon_responses=min_bon_responses,
        system=system,
    )
    result.category_source = source
    safe = seconds if seconds > 0 else math.nan
    result.throughput = Throughput(
        seconds=seconds,
        responses_per_second=len(responses) / safe,
        pairs_per_second=n_pairs / safe,
        batch_size=batch_size,
    )
    result.meta = dict(meta or {})
    a = result.overall.agreement
    logger.info(
        "agreement %.4f [%.4f, %.4f] on %d pairs; %.1f responses/s",
        a.value,
        a.ci_low,
        a.ci_high,
        a.n,
        result.throughput.responses_per_second,
    )
    return result


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


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100.0 * x:.1f}"


def _ci(e: Estimate | None) -> str:
    if e is None or not (math.isfinite(e.ci_low) and math.isfinite(e.ci_high)):
        return "-"
    return f"[{_pct(e.ci_low)}, {_pct(e.ci_high)}]"


def _est_cell(e: Estimate) -> str:
    if e.n == 0:
        return "- (n=0)"
    return f"{_pct(e.value)} {_ci(e)} (n={e.n})"


def _corr(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def _result_markdown(r: EvalResult) -> str:
    level = f"{100 * r.confidence:g}%"
    rows = [r.overall, *r.per_category]
    title = f"Evaluation: {r.system}" if r.system else "Evaluation"
    lines = [f"# {title}", ""]
    o = r.overall
    lines.append(
        f"{o.n_records} records, {o.n_responses} responses, {o.agreement.n} untied human pairs, "
        f"{o.human_ties_excluded} human-tied pairs excluded. Categories from: {r.category_source}. "
        f"Shares in %; {level} CIs: percentile bootstrap over records, {r.n_resamples} resamples, seed {r.seed}. "
        "Reward ties count as half agreement. Longer-wins baseline: the longer response is predicted better. "
        '"Shorter wins" / "longer wins": agreement on the pairs whose human-better response is the shorter / '
        "longer one (equal lengths excluded, counted in the last column)."
    )
    lines += ["", "## Agreement with human preferences", ""]
    lines.append(
        f"| category | records | pairs | human ties excluded | agreement | {level} CI | longer-wins baseline "
        "| agreement when shorter wins | agreement when longer wins | equal-length pairs |"
    )
    lines.append("|---|---:|---:|---:|---:|---|---:|---|---|---:|")
    for row in rows:
        name = f"**{row.category}**" if row.category == ALL else row.category
        a = row.agreement
        ln = row.length
        lines.append(
            f"| {name} | {row.n_records} | {a.n} | {row.human_ties_excluded} | {_pct(a.value)} | {_ci(a)} "
            f"| {_pct(ln.longer_wins_baseline.value)} | {_est_cell(ln.when_shorter_better)} "
            f"| {_est_cell(ln.when_longer_better)} | {ln.equal_length_pairs} |"
        )
    bon_rows = [row for row in rows if row.best_of_n is not None]
    if bon_rows:
        lines += ["", "## Best-of-n accuracy (records with 3 or more responses)", ""]
        lines.append(f"| category | records | accuracy | {level} CI |")
        lines.append("|---|---:|---:|---|")
        for row in bon_rows:
            b = row.best_of_n
            assert b is not None
            lines.append(f"| {row.category} | {b.n} | {_pct(b.value)} | {_ci(b)} |")
    has_tokens = any(row.length.pearson_tokens is not None for row in rows)
    lines += ["", "## Correlation of reward with response length", ""]
    head = "| category | Pearson (chars) | Spearman (chars) | Pearson within prompt (chars) |"
    sep = "|---|---:|---:|---:|"
    if has_tokens:
        head += " Pearson (tokens) | Spearman (tokens) |"
        sep += "---:|---:|"
    lines += [head, sep]
    for row in rows:
        ln = row.length
        line = (
            f"| {row.category} | {_corr(ln.pearson_chars)} | {_corr(ln.spearman_chars)} "
            f"| {_corr(ln.pearson_chars_within_prompt)} |"
        )
        if has_tokens:
            line += f" {_corr(ln.pearson_tokens)} | {_corr(ln.spearman_tokens)} |"
        lines.append(line)
    if r.throughput is not None:
        t = r.throughput
        lines += ["", "## Throughput", ""]
        lines.append(
            f"Scored {o.n_responses} responses ({o.agreement.n} pairs) in {t.seconds:.4g} s: "
            f"{t.responses_per_second:.2f} responses/s, {t.pairs_per_second:.2f} pairs/s "
            f"(batch size {t.batch_size})."
        )
    return "\n".join(lines) + "\n"


def comparison_table(
    results: Mapping[str, EvalResult], *, systems_as: Literal["rows", "columns"] = "rows"
) -> str:
    """One Markdown table comparing systems: overall agreement with its CI, then agreement per category (%).

    Keys of ``results`` name the systems. Categories are the union over systems; a system without a category
    shows ``-``. When every system has the same pair count for a category, the count goes in the header,
    otherwise (e.g. categories from each system's own router) into each cell.
    """
    if not results:
        raise ValueError("comparison_table: no results")
    names = list(results)
    cats = sorted({c for r in results.values() for c in r.categories})
    columns = [ALL, *cats]

    def lookup(r: EvalResult, c: str) -> CategoryMetrics | None:
        try:
            return r.category(c)
        except KeyError:
            return None

    headers: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for c in columns:
        counts = {m.agreement.n for r in results.values() if (m := lookup(r, c)) is not None}
        same = len(counts) == 1
        label = "overall" if c == ALL else c
        headers.append(f"{label} (n={counts.pop()})" if same else label)
        for s in names:
            m = lookup(results[s], c)
            if m is None:
                cells[s, c] = "-"
                continue
            text = _pct(m.agreement.value)
            if c == ALL:
                text += f" {_ci(m.agreement)}"
            if not same:
                text += f" (n={m.agreement.n})"
            cells[s, c] = text
    if systems_as == "rows":
        lines = ["| system | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
        lines += ["| " + s + " | " + " | ".join(cells[s, c] for c in columns) + " |" for s in names]
    elif systems_as == "columns":
        lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [
            "| " + h + " | " + " | ".join(cells[s, c] for s in names) + " |"
            for h, c in zip(headers, columns, strict=True)
        ]
    else:
        raise ValueError(f"systems_as: use 'rows' or 'columns', got {systems_as!r}")
    return "\n".join(lines) + "\n"


def length_table(results: Mapping[str, EvalResult], category: str = ALL) -> str:
    """One Markdown table comparing systems on length: agreement beside the length-controlled agreements.

    One row per system (keys of ``results``) for ``category`` (default: all records): raw agreement, the
    longer-wins baseline on the same pairs, agreement when the shorter response is the better one and when the
    longer is (each with its interval and pair count), and the reward's Pearson correlation with length in
    characters, within prompt, and in tokens where token lengths were given. A system without the category
    shows ``-``.
    """
    if not results:
        raise ValueError("length_table: no results")
    lines = [
        "| system | agreement | longer-wins baseline | agreement when shorter wins "
        "| agreement when longer wins | r(reward, chars) | r within prompt (chars) | r(reward, tokens) |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        try:
            m = r.category(category)
        except KeyError:
            lines.append(f"| {name} |" + " - |" * 7)
            continue
        ln = m.length
        lines.append(
            f"| {name} | {_est_cell(m.agreement)} | {_est_cell(ln.longer_wins_baseline)} "
            f"| {_est_cell(ln.when_shorter_better)} | {_est_cell(ln.when_longer_better)} "
            f"| {_corr(ln.pearson_chars)} | {_corr(ln.pearson_chars_within_prompt)} | {_corr(ln.pearson_tokens)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Ensembles (Coste et al. 2023)
# --------------------------------------------------------------------------------------------------------------

ENSEMBLE_RULES = ("mean", "min", "uwo")
"""Combination rules: mean, worst case (``min``, Coste et al.'s WCO) and uncertainty-weighted (``uwo``)."""

_RULE_ALIASES = {
    "mean": "mean",
    "min": "min",
    "wco": "min",
    "worst_case": "min",
    "uwo": "uwo",
    "uncertainty_weighted": "uwo",
}


def _rule(rule: str) -> str:
    try:
        return _RULE_ALIASES[rule.lower()]
    except KeyError:
        raise ValueError(
            f"rule: unknown ensemble rule {rule!r}; use one of {', '.join(ENSEMBLE_RULES)}"
        ) from None


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def combine_rewards(scores: Any, rule: str = "mean", lam: float = 0.5) -> Any:
    """Combine member rewards of shape ``[n_models, ...]`` over the first axis.

    ``mean``: the average. ``min`` (alias ``wco``): the worst case. ``uwo``: ``mean - lam * var`` with the
    population variance (``ddof=0``, divide by n_models) as in Coste et al. 2023 (their UWO equation and
    ``np.var`` in their code); ``lam`` defaults to their 0.5. Works on numpy arrays (also nested lists) and
    torch tensors, returning the same kind. Members should be on comparable scales (e.g. each normalised on
    a reference set), otherwise the min and the variance are dominated by the widest member.
    """
    r = _rule(rule)
    if _is_torch(scores):
        if scores.ndim == 0 or scores.shape[0] == 0:
            raise ValueError("scores: need shape [n_models, ...] with n_models >= 1")
        if r == "mean":
            return scores.mean(dim=0)
        if r == "min":
            return scores.amin(dim=0)
        return scores.mean(dim=0) - lam * scores.var(dim=0, correction=0)
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError("scores: need shape [n_models, ...] with n_models >= 1")
    if r == "mean":
        return arr.mean(axis=0)
    if r == "min":
        return arr.min(axis=0)
    return arr.mean(axis=0) - lam * arr.var(axis=0, ddof=0)


@dataclass
class EnsembleRewardOutput(RewardOutput):
    """A :class:`~dmoerm.outputs.RewardOutput` whose reward combines several members' rewards."""

    member_rewards: list[float] = field(default_factory=list)
    """Each member's own reward, in the order of ``EnsembleScorer.scorers``."""
    rule: str = "mean"


class EnsembleScorer:
    """Several Scorers combined into one (implements the :class:`~dmoerm.outputs.Scorer` protocol).

    Each member scores every response; the reward is :func:`combine_rewards` of the members' rewards.
    ``capability_scores`` is empty; ``category`` is kept only when all members report the same one.
    ``max_length`` is the smallest of the members'.
    """

    def __init__(self, scorers: Sequence[Scorer], rule: str = "mean", lam: float = 0.5) -> None:
        if not scorers:
            raise ValueError("scorers: an ensemble needs at least one member")
        self.scorers = list(scorers)
        self.rule = _rule(rule)
        self.lam = float(lam)
        self.max_length = min(int(s.max_length) for s in self.scorers)

    def score(
        self, conversations: list[list[Message]], responses: list[str], batch_size: int = 16
    ) -> list[RewardOutput]:
        """Score with every member and combine."""
        outs = [s.score(conversations, responses, batch_size=batch_size) for s in self.scorers]
        for k, o in enumerate(outs):
            if len(o) != len(responses):
                raise ValueError(f"member {k} returned {len(o)} outputs for {len(responses)} responses")
        members = np.array([[o.reward for o in out] for out in outs], dtype=np.float64).reshape(
            len(self.scorers), len(responses)
        )
        combined = combine_rewards(members, self.rule, self.lam)
        result: list[RewardOutput] = []
        for i in range(len(responses)):
            cats = {out[i].category for out in outs}
            cat = cats.pop() if len(cats) == 1 else None
            result.append(
                EnsembleRewardOutput(
                    reward=float(combined[i]),
                    category=cat,
                    member_rewards=members[:, i].tolist(),
                    rule=self.rule,
                )
            )
        return result

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """Score rendered prompt+response strings with every member and combine."""
        members = np.array(
            [s.score_texts(texts, batch_size=batch_size) for s in self.scorers], dtype=np.float64
        ).reshape(len(self.scorers), len(texts))
        return [float(x) for x in combine_rewards(members, self.rule, self.lam)]


# --------------------------------------------------------------------------------------------------------------
# Best-of-n over-optimisation (Gao et al. 2022)
# --------------------------------------------------------------------------------------------------------------


def bon_kl(n: int | float | Sequence[int] | np.ndarray) -> float | np.ndarray:
    """KL divergence of best-of-n sampling from the base policy: ``log(n) - (n - 1) / n`` (Gao et al. 2022)."""
    if np.ndim(n) == 0:
        v = float(n)
        if v < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        return math.log(v) - (v - 1.0) / v
    arr = np.asarray(n, dtype=np.float64)
    if np.any(arr < 1):
        raise ValueError("n: every n must be >= 1")
    return np.log(arr) - (arr - 1.0) / arr


def bon_weights(n: int, n_max: int) -> np.ndarray:
    """Probability that the i-th smallest of ``n_max`` samples (i = 1..n_max) is the max of a random n-subset.

    ``C(i - 1, n - 1) / C(n_max, n)``, computed in log space (stable for n_max in the tens of thousands);
    zero for i < n, sums to 1 (hockey-stick identity).
    """
    if not 1 <= n <= n_max:
        raise ValueError(f"n: need 1 <= n <= n_max ({n_max}), got {n}")
    i = np.arange(n, n_max + 1, dtype=np.float64)
    # log C(i-1, n-1) = sum_{k=n}^{i-1} log(k / (k - n + 1)); 0 at i = n.
    steps = np.log(i[:-1]) - np.log(i[:-1] - n + 1.0)
    logw = np.concatenate([[0.0], np.cumsum(steps)])
    logw -= logw.max()
    w = np.exp(logw)
    out = np.zeros(n_max, dtype=np.float64)
    out[n - 1 :] = w / w.sum()
    return out


def bon_expected(proxy: np.ndarray, values: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """Expected ``values`` of the proxy's best-of-n choice, averaged over prompts, for each n in ``ns``.

    ``proxy`` and ``values`` are ``[prompts, n_max]``. For each n this is the unbiased estimator over all
    size-n subsets of the n_max samples of each prompt (Gao et al. 2022, appendix): sort each row by proxy,
    weight the i-th smallest by :func:`bon_weights`. Tied proxy scores are broken uniformly at random, in
    expectation: the weights are averaged within each run of tied scores. Returns ``[len(ns)]``.
    """
    p = np.asarray(proxy, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if p.ndim != 2 or p.shape != v.shape:
        raise ValueError(f"proxy and values: need equal [prompts, n_max] shapes, got {p.shape} and {v.shape}")
    if p.shape[0] == 0:
        raise ValueError("proxy: no prompts")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(v))):
        raise ValueError("proxy and values: must be finite")
    rows, n_max = p.shape
    order = np.argsort(p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)
    vs = np.take_along_axis(v, order, axis=1)
    starts = np.concatenate([np.ones((rows, 1), dtype=bool), ps[:, 1:] != ps[:, :-1]], axis=1)
    has_ties = not bool(starts.all())
    if has_ties:
        block = np.cumsum(starts, axis=1) - 1 + (np.arange(rows) * n_max)[:, None]
        block = block.reshape(-1)
        sizes = np.bincount(block, minlength=rows * n_max).astype(np.float64)
    out = np.empty(len(ns), dtype=np.float64)
    for k, n in enumerate(ns):
        w = bon_weights(int(n), n_max)
        if has_ties:
            wb = np.bincount(block, weights=np.tile(w, rows), minlength=rows * n_max)
            wmat = (wb[block] / sizes[block]).reshape(rows, n_max)
            out[k] = float((wmat * vs).sum(axis=1).mean())
        else:
            out[k] = float((vs @ w).mean())
    return out


@dataclass
class BonCurve:
    """Best-of-n results of one proxy reward at several n."""

    ns: list[int]
    kl: list[float]
    """``bon_kl(n)`` for each n."""
    gold: list[float]
    """Expected gold reward of the proxy's choice."""
    proxy: list[float]
    """Expected proxy reward of the proxy's choice."""
    length: list[float] | None = None
    """Expected length of the chosen response, when lengths were given."""


def bon_curve(
    proxy: np.ndarray,
    gold: np.ndarray,
    ns: Sequence[int] | None = None,
    lengths: np.ndarray | None = None,
) -> BonCurve:
    """Gold reward, proxy reward and (optionally) chosen length of best-of-n by ``proxy``, per n.

    ``proxy``, ``gold`` and ``lengths`` are ``[prompts, n_max]``; ``ns`` defaults to powers of two up to
    n_max (plus n_max). Uses :func:`bon_expected`.
    """
    p = np.asarray(proxy, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proxy: need [prompts, n_max], got shape {p.shape}")
    n_max = p.shape[1]
    if ns is None:
        ns = sorted({2**k for k in range(int(math.log2(n_max)) + 1)} | {n_max})
    ns = [int(n) for n in ns]
    if any(n < 1 or n > n_max for n in ns):
        raise ValueError(f"ns: every n must be in [1, {n_max}], got {ns}")
    return BonCurve(
        ns=ns,
        kl=[float(bon_kl(n)) for n in ns],
        gold=bon_expected(p, gold, ns).tolist(),
        proxy=bon_expected(p, p, ns).tolist(),
        length=bon_expected(p, lengths, ns).tolist() if lengths is not None else None,
    )


def plot_bon_curves(
    curves: Mapping[str, BonCurve],
    path: str | Path,
    *,
    y: Literal["gold", "proxy", "length"] = "gold",
    x: Literal["kl", "sqrt_kl"] = "kl",
    title: str | None = None,
) -> Path:
    """Plot one line per proxy of ``y`` (gold reward, proxy reward or chosen length) against best-of-n KL.

    Writes a PNG to ``path`` (parent folders created) and returns it. ``x="sqrt_kl"`` uses Gao et al.'s
    ``d = sqrt(KL)`` axis. Uses matplotlib's Agg backend, selected here rather than at import.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("curves: nothing to plot")
    labels = {"gold": "gold reward", "proxy": "proxy reward", "length": "length of chosen response"}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    try:
        for name, c in curves.items():
            ys = getattr(c, y)
            if ys is None:
                raise ValueError(f"curve {name!r} has no {y} values")
            xs = np.sqrt(np.asarray(c.kl)) if x == "sqrt_kl" else np.asarray(c.kl)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_xlabel("sqrt(KL) (nats^0.5)" if x == "sqrt_kl" else "KL(best-of-n || base) (nats)")
        ax.set_ylabel(labels[y])
        ax.set_title(title or f"Best-of-n: {labels[y]} vs KL")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    logger.info("wrote %s", out)
    return out


# --------------------------------------------------------------------------------------------------------------
# dmoerm eval
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """``dmoerm eval``: agreement of a saved model (single reward model or DMoERM) with human labels."""

    model: str
    """A model directory written by ``save_pretrained`` (either kind; :func:`dmoerm.model.load_model`)."""
    data: list[str]
    """Bundled source names (``rmb/pairwise``, ``pandalm/test``, ...) or files (JSONL, JSON, Parquet, a
    ``datasets`` folder, ``folder:split``) in the documented schema or TRL's preference formats."""
    out: str | None = None
    """Folder for ``eval.json`` and ``eval.md``; None writes nothing (the table is still logged and returned)."""
    taxonomy: str | None = None
    """Taxonomy that maps the data's own category labels onto categories; None uses the model's taxonomy
    (DMoERM) or the ``default`` preset (single reward model)."""
    categories: str = "auto"
    """Per-category rows by ``auto`` (the record's category, else the router's), ``record`` or ``scorer``."""
    limit: int | None = None
    """Records per data source at most (the first ones); None for all."""
    batch_size: int = 16
    """Responses per forward pass."""
    n_resamples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap."""
    skip_bad: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    system: str | None = None
    """Row label in comparison tables; None uses the model folder's name."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.model:
            raise ValueError("model: give the model directory to evaluate")
        if not self.data:
            raise ValueError("data: name at least one source (e.g. rmb/pairwise) or JSONL file")
        if self.categories not in ("auto", "record", "scorer"):
            raise ValueError(f"categories: {self.categories!r} is not one of auto, record, scorer")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: {self.limit} must be >= 1, or None for all records")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1")
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples: {self.n_resamples} must be >= 0 (0 skips the intervals)")


def load_eval_records(
    data: Sequence[str],
    taxonomy,
    data_dir: str | None = None,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
) -> list[PreferenceRecord]:
    """Preference records of every source or file in ``data``, categories mapped by ``taxonomy`` (None: left
    as the files give them); a file of prompts without responses, or one with no record at all (empty,
    blank lines only, every line skipped), is an error naming it (``dmoerm eval`` and ``dmoerm eval-judge``)."""
    from dmoerm.data import load_data
    from dmoerm.taxonomy import assign_categories

    if isinstance(data, str) or not data:
        raise ValueError(f"data: {data!r}; give a list of one or more sources or files")
    records: list[PreferenceRecord] = []
    for name in data:
        loaded = load_data(name, data_dir, skip_bad=skip_bad, limit=limit)
        if not loaded:
            skipped = f" ({loaded.report.skipped} bad line(s) skipped)" if loaded.report.skipped else ""
            raise ValueError(f"data: {name}: no records to evaluate{skipped}; is it empty or blank?")
        if not isinstance(loaded[0], PreferenceRecord):
            raise ValueError(f"data: {name!r} holds prompts without responses; evaluation needs preferences")
        records.extend(loaded if taxonomy is None else assign_categories(loaded, taxonomy))
    return records


def run_eval(config: EvalConfig) -> EvalResult:
    """Load the model and the data, score every response, write ``eval.json``/``eval.md`` to ``config.out``."""
    from dmoerm.model import DMoERM, load_model
    from dmoerm.taxonomy import assign_categories, load_taxonomy

    # The data first: a bad or empty file fails in a second, before the model loads.
    records = load_eval_records(
        config.data, None, config.data_dir, limit=config.limit, skip_bad=config.skip_bad
    )
    model = load_model(config.model)
    if config.taxonomy is not None:
        taxonomy = load_taxonomy(config.taxonomy)
    elif isinstance(model, DMoERM):
        taxonomy = model.taxonomy
    else:
        taxonomy = load_taxonomy("default")
    records = assign_categories(records, taxonomy)
    result = evaluate(
        model,
        records,
        batch_size=config.batch_size,
        categories=config.categories,
        token_lengths=response_token_lengths(model.tokenizer, records),
        n_resamples=config.n_resamples,
        seed=config.seed,
        system=config.system or Path(config.model).name,
        meta={"model": str(config.model), "data": list(config.data), "limit": config.limit},
    )
    if config.out:
        write_eval(result, config.out)
    return result
