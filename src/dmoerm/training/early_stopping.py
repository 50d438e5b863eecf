"""Early stopping on dev agreement: keep the best weights, stop after ``patience`` evaluations without gain."""

from __future__ import annotations

import math
from collections.abc import Callable


class EarlyStopping:
    """The best dev agreement so far, the weights that had it, and the evaluations since then.

    Every rank of a data-parallel run sees the same (gathered) agreement, so every rank decides alike."""

    def __init__(self, patience: int, best_agreement: float = math.nan, best=None, bad: int = 0):
        self.patience = patience
        """Evaluations without improvement before stopping (0 never stops)."""
        self.best_agreement = best_agreement
        self.best = best
        """Whatever ``snapshot`` returned at the best evaluation (None before the first)."""
        self.bad = bad

    def record(self, agreement: float, snapshot: Callable[[], object]) -> bool:
        """Count one evaluation; take ``snapshot()`` as the best when it improves (the first always does).
        True when it improved."""
        if not agreement <= self.best_agreement:  # also true for the first (nan) comparison
            self.best_agreement, self.best, self.bad = agreement, snapshot(), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Patience ran out."""
        return bool(self.patience) and self.bad >= self.patience
