"""Best-of-n over-optimisation estimators (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

``KL_bon(n) = log n - (n - 1) / n``, and the unbiased estimator over all size-n subsets of the n_max samples
(Gao et al., appendix; Coste et al.'s ``unbiased_sampler``), with proxy ties broken uniformly at random *in
expectation* (exact, no sampling). :func:`plot_bon_curves` draws the gold (or proxy, or length) curves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)


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
