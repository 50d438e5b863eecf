"""Sign-test gates: is a specialised model (phase 1 from a warm start, or phase 3's correction) better than its
start on dev pairs, by more than chance?

Two ways to read dev. :func:`sign_test_gate` tests one set of rewards on given records (all of dev, or a
held-back share that early stopping did not read). :func:`cross_fit_gate` reads every dev record and still
never tests a record on the epoch it helped pick: each half of dev picks its own best evaluation, that pick is
tested on the other half, and the two halves' counts are summed into one sign test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dmoerm.encoding import RankedItem
from dmoerm.training.early_stopping import EarlyStopping
from dmoerm.training.loop import pair_agreement


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided sign test: the chance of at least ``wins`` of ``wins + losses`` fair coin flips."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def flips(items: Sequence[RankedItem], changed, start) -> tuple[int, int]:
    """(pairs ``changed`` ranks right and ``start`` wrong, the reverse) over the pairs of ``items``; rewards
    per item, as :func:`~dmoerm.training.loop.score_items` gives them."""
    wins = losses = 0
    for item, c, s in zip(items, changed, start, strict=True):
        for better, worse in item.pairs:
            right_c, right_s = c[better] > c[worse], s[better] > s[worse]
            wins, losses = wins + (right_c and not right_s), losses + (right_s and not right_c)
    return wins, losses


def sign_test_gate(items: Sequence[RankedItem], changed, start, alpha: float) -> dict:
    """Does ``changed`` beat ``start`` on the pairs of ``items`` they rank differently? The pairs it turns
    right and wrong, the one-sided sign test's p, and ``kept``: p < ``alpha``."""
    wins, losses = flips(items, changed, start)
    p = sign_test_p(wins, losses)
    return {"turned_right": wins, "turned_wrong": losses, "p": p, "kept": p < alpha}


def halves(n: int) -> tuple[range, range]:
    """The two halves of ``n`` dev records (dev is drawn in a seeded random order, so each is a random half)."""
    return range(0, n // 2), range(n // 2, n)


def _agreement(items: Sequence[RankedItem], rewards, rows: range) -> float:
    return pair_agreement([items[i] for i in rows], [rewards[i] for i in rows])


def _early_stop(items, evaluations, rows: range, patience: int) -> tuple[int, bool]:
    """(the evaluation early stopping keeps when it reads only ``rows``, whether its patience ran out):
    evaluations are read in order until ``patience`` of them in a row bring no gain."""
    stopping = EarlyStopping(patience)
    for k, rewards in enumerate(evaluations):
        if stopping.should_stop:
            break
        stopping.record(_agreement(items, rewards, rows), lambda k=k: k)
    return stopping.best, stopping.should_stop


def cross_fit_pending(items: Sequence[RankedItem], evaluations: Sequence, patience: int) -> bool:
    """True while a half's own early stopping has not run out of patience over ``evaluations`` (each a list of
    rewards per dev item, the start first): training must go on, else that half's pick would depend on when
    the other records stopped the run."""
    if len(items) < 2:
        return False
    return not all(_early_stop(items, evaluations, rows, patience)[1] for rows in halves(len(items)))


def cross_fit_gate(items: Sequence[RankedItem], evaluations: Sequence, patience: int, alpha: float) -> dict:
    """The sign test over every dev record, each tested on an evaluation picked without it.

    ``evaluations``: rewards per dev item at each dev evaluation, the start's first. Each half picks its best
    evaluation as early stopping with ``patience`` would reading only that half; the pick's flips against the
    start are counted on the other half; the two halves' counts are summed into one one-sided sign test.
    Also ``halves``: each half's pick (0 = the start) and the flips it scored on the other half."""
    if len(items) < 2 or len(evaluations) < 1:
        return {}
    first, second = halves(len(items))
    wins = losses = 0
    detail = []
    for picker, tested in ((first, second), (second, first)):
        pick, _ = _early_stop(items, evaluations, picker, patience)
        rows = list(tested)
        w, lo = flips(
            [items[i] for i in rows], [evaluations[pick][i] for i in rows], [evaluations[0][i] for i in rows]
        )
        wins, losses = wins + w, losses + lo
        detail.append({"picked": pick, "turned_right": w, "turned_wrong": lo})
    p = sign_test_p(wins, losses)
    return {"turned_right": wins, "turned_wrong": losses, "p": p, "kept": p < alpha, "halves": detail}
