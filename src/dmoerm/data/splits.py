"""Prompt-disjoint splits: a prompt's split depends only on its :func:`~dmoerm.data.prompt_key`, the seed
and the fractions."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any


def _validate_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(
            "fractions: give a non-empty mapping of split name -> fraction, e.g. {'train': 0.9, 'test': 0.1}"
        )
    items = []
    for name, frac in fractions.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"fractions: split name {name!r} must be a non-empty string")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac):
            raise ValueError(f"fractions[{name!r}]: {frac!r} is not a number")
        if not 0 <= frac <= 1:
            raise ValueError(f"fractions[{name!r}]: {frac} is outside [0, 1]")
        items.append((name, float(frac)))
    total = sum(f for _, f in items)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"fractions: they sum to {total:g}; they must sum to 1 (e.g. {{'train': 0.9, 'test': 0.1}})"
        )
    return items


def split_by_prompt(records: Iterable[Any], fractions: Mapping[str, float], seed: int = 0) -> dict[str, list]:
    """Split records by a hash of ``prompt_key`` and ``seed``: every prompt lands in exactly one split.

    The assignment of a prompt depends only on its conversation, the seed and the fractions, not on the other
    records or the loader, so records on the same prompt from different sources stay together. Returns every
    split name (in the order given, possibly with an empty list), each list in input order.
    """
    items = _validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r}; use an integer")
    bounds = []
    acc = 0.0
    for name, frac in items:
        acc += frac
        bounds.append((name, acc))
    out: dict[str, list] = {name: [] for name, _ in items}
    last = next(name for name, frac in reversed(items) if frac > 0)
    for rec in records:
        h = hashlib.sha256(f"{seed}\x00{rec.prompt_key}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        target = last
        for name, upper in bounds:
            if u < upper:
                target = name
                break
        out[target].append(rec)
    return out
