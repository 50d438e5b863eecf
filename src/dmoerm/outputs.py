"""Named outputs of every scorer, and the protocol that scoring clients (server, TRL, evaluation) rely on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dmoerm.data import Message


class InputTooLongError(ValueError):
    """A rendered input is over the scorer's token limit (cutting it would lose its start or its end).

    The one class every scorer raises for that and the reward server answers with 413 (re-exported by
    :mod:`dmoerm.serving`).
    """


@dataclass
class RewardOutput:
    """What a reward model says about one (conversation, response)."""

    reward: float
    """The scalar reward (higher is better)."""
    category: str | None = None
    """The category whose inner model scored it (DMoERM), or None for a single reward model."""
    category_probability: float | None = None
    """The router's probability for that category."""
    capability_scores: dict[str, float] = field(default_factory=dict)
    """Each capability expert's own scalar score (DMoERM), empty for a single reward model."""


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores responses: a single reward model, a DMoERM, an ensemble."""

    max_length: int
    """Token limit of one rendered (conversation, response)."""

    def score(
        self, conversations: list[list[Message]], responses: list[str], batch_size: int = 16
    ) -> list[RewardOutput]:
        """Score ``responses[i]`` as the next assistant turn of ``conversations[i]``."""
        ...

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """Score already rendered prompt+response strings (OpenRLHF's remote reward API)."""
        ...
