"""Metrics and reports that every reward system in the project is judged by, and the experiments built on them.

Modules, one concept each: :mod:`~dmoerm.evaluation.results` (result types, ``eval.json``/``eval.md``),
:mod:`~dmoerm.evaluation.metrics` (pure functions of rewards and human rankings), :mod:`~dmoerm.evaluation.tables`
(Markdown), :mod:`~dmoerm.evaluation.ensembles` (combining reward models), :mod:`~dmoerm.evaluation.best_of_n`
(best-of-n estimators and plots), :mod:`~dmoerm.evaluation.run` (``dmoerm eval``: the driver over the
:class:`~dmoerm.outputs.Scorer` protocol), and the experiments :mod:`~dmoerm.evaluation.finegrained`
(``dmoerm finegrained``) and :mod:`~dmoerm.evaluation.overopt` (``dmoerm overopt``).

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

The experiments' names (``FineGrainedConfig``, ``run_overopt``, ...) are loaded on first use: those modules train
models through :mod:`dmoerm.pipeline` (torch, transformers), which itself imports the metrics from here, so
``import dmoerm.evaluation`` stays light and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

from dmoerm.evaluation.best_of_n import (
    BonCurve,
    bon_curve,
    bon_expected,
    bon_kl,
    bon_weights,
    plot_bon_curves,
)
from dmoerm.evaluation.ensembles import ENSEMBLE_RULES, EnsembleRewardOutput, EnsembleScorer, combine_rewards
from dmoerm.evaluation.metrics import (
    bootstrap_ci,
    compute_metrics,
    pairwise_agreement,
    pearson,
    response_token_lengths,
    spearman,
)
from dmoerm.evaluation.results import (
    ALL,
    UNCATEGORIZED,
    CategoryMetrics,
    Estimate,
    EvalResult,
    LengthMetrics,
    Throughput,
    load_eval,
    write_eval,
)
from dmoerm.evaluation.run import EvalConfig, evaluate, load_eval_records, run_eval
from dmoerm.evaluation.tables import comparison_table, length_table

_EXPERIMENTS = {
    "FINEGRAINED_SOURCE": "finegrained",
    "CATEGORY": "finegrained",
    "FineGrainedConfig": "finegrained",
    "expert_agreement": "finegrained",
    "judge_vs_human": "finegrained",
    "run_finegrained": "finegrained",
    "finegrained_markdown": "finegrained",
    "OverOptConfig": "overopt",
    "run_overopt": "overopt",
    "overopt_markdown": "overopt",
}
"""Public names of the experiments (formerly ``dmoerm.experiments``) -> their module, imported on first use."""

__all__ = [
    # results
    "UNCATEGORIZED",
    "ALL",
    "Estimate",
    "LengthMetrics",
    "CategoryMetrics",
    "Throughput",
    "EvalResult",
    "write_eval",
    "load_eval",
    # metrics
    "pairwise_agreement",
    "bootstrap_ci",
    "pearson",
    "spearman",
    "compute_metrics",
    "response_token_lengths",
    # tables
    "comparison_table",
    "length_table",
    # ensembles
    "ENSEMBLE_RULES",
    "combine_rewards",
    "EnsembleRewardOutput",
    "EnsembleScorer",
    # best-of-n
    "bon_kl",
    "bon_weights",
    "bon_expected",
    "BonCurve",
    "bon_curve",
    "plot_bon_curves",
    # dmoerm eval
    "EvalConfig",
    "evaluate",
    "load_eval_records",
    "run_eval",
    # experiments (loaded on first use)
    "FINEGRAINED_SOURCE",
    "CATEGORY",
    "FineGrainedConfig",
    "expert_agreement",
    "judge_vs_human",
    "run_finegrained",
    "finegrained_markdown",
    "OverOptConfig",
    "run_overopt",
    "overopt_markdown",
]


def __getattr__(name: str) -> Any:
    module = _EXPERIMENTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
