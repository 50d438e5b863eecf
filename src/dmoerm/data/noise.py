"""Known label noise for the over-optimisation experiments: a seeded share of rankings reversed."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

from dmoerm.data.records import PreferenceRecord


def with_label_noise(
    records: Iterable[PreferenceRecord], share: float, seed: int = 0
) -> list[PreferenceRecord]:
    """Reverse the human ranking of about ``share`` of the records (best becomes worst; ties stay tied).

    The over-optimisation experiments of Gao et al. 2022 and Coste et al. 2023 train proxy reward models on
    labels with a known share flipped (25% in Coste et al.). Whether a record flips depends only on its prompt,
    its responses and ``seed``, so a record keeps its fate across runs and subsets.
    """
    if not 0.0 <= share < 0.5:
        raise ValueError(f"label_noise: {share} must be in [0, 0.5) (0.5 and above would invert the labels)")
    out = []
    for rec in records:
        h = hashlib.sha256(f"{seed}\x00{rec.prompt_key}\x00{rec.responses!r}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2.0**64 < share:
            worst = max(rec.ranks)
            rec = dataclasses.replace(rec, ranks=tuple(worst - r for r in rec.ranks))
        out.append(rec)
    return out
