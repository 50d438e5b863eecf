"""Small builders shared by tests (records with a known preference rule)."""

from __future__ import annotations

import random

from dmoerm.data import Message, PreferenceRecord

WORDS = "the quick brown fox jumps over lazy dog paris capital france water boils helpful answer".split()


def length_records(n: int, seed: int = 0, category: str | None = None) -> list[PreferenceRecord]:
    """Pairs where the longer response is chosen: a rule a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + f" #{i}"
        short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        long = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 16)))
        out.append(
            PreferenceRecord.from_pair(
                [Message("user", prompt)], long, short, category=category, source="test", uid=str(i)
            )
        )
    return out


def tiny_taxonomy():
    """Two categories, three capability points: enough for routing, several experts and one lone expert."""
    from dmoerm.taxonomy import Capability, Category, Taxonomy

    return Taxonomy(
        name="tiny",
        categories=(
            Category(
                "code",
                "programming",
                (Capability("correctness", "is it right"), Capability("brevity", "is it short")),
            ),
            Category("chat", "talk", (Capability("empathy", "is it kind"),)),
        ),
    )
