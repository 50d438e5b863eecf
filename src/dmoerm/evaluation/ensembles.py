r"""Ensembles of reward models (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization").

:func:`combine_rewards` combines member rewards by the mean, the worst case (min) or the uncertainty-weighted
``mean - lam * var`` (population variance over members, divide by k, as in their UWO equation and their code's
``np.var``; ``lam`` defaults to 0.5, the default of their best-of-n scripts). :class:`EnsembleScorer` applies a
rule to several :class:`~dmoerm.outputs.Scorer`\ s so that an ensemble is evaluated like any other system.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmoerm.data import Message
from dmoerm.outputs import RewardOutput, Scorer

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
