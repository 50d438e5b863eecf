"""Pure metrics of a set of rewards against human rankings: agreement, best-of-n accuracy, bootstrap intervals,
correlations and the length controls (conventions in :mod:`dmoerm.evaluation` and ``docs/evaluation.md``).

Everything here works on plain rewards (one float per response of each :class:`~dmoerm.data.PreferenceRecord`),
so a single reward model, a DMoERM, an ensemble and an LLM judge are measured the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmoerm.data import PreferenceRecord
from dmoerm.evaluation.results import (
    ALL,
    UNCATEGORIZED,
    CategoryMetrics,
    Estimate,
    EvalResult,
    LengthMetrics,
)


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


def _paired(
    name: str, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as flat float64 arrays of one length (a ValueError naming ``name`` otherwise)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{name}: lengths differ ({a.shape[0]} vs {b.shape[0]})")
    return a, b


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than 2 points or either side is constant."""
    a, b = _paired("pearson", x, y)
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
    a, b = _paired("spearman", x, y)
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
