"""The run's records: every preference source loaded onto the taxonomy's categories, and the prompt-disjoint
per-category splits of the phases (phase 1, the records to label, phase 3, dev, test)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields

from dmoerm.data import PreferenceRecord, conversation_key, load_data, split_by_prompt, with_label_noise
from dmoerm.pipeline.config import DataConfig
from dmoerm.taxonomy import assign_categories

POOLED = "pooled"
"""The one category of the "without router" ablation."""


@dataclass
class Splits:
    """Per-category record lists of every phase."""

    phase1: dict[str, list[PreferenceRecord]]
    """Human rankings phase 1 trains each category's reward model on."""
    to_label: dict[str, list[PreferenceRecord]]
    """Phase-1 records whose pairs the judge labels per capability point (phase 2's training data)."""
    phase3: dict[str, list[PreferenceRecord]]
    """Human rankings the aggregator trains on (disjoint by prompt from phase 1)."""
    dev: dict[str, list[PreferenceRecord]]
    """Held-back rankings for early stopping."""
    test: dict[str, list[PreferenceRecord]]
    """Held-back rankings of the final comparison."""

    def pooled(self, name: str) -> Splits:
        """Every category's records of each phase under one category ``name`` (records keep their own
        ``category``)."""
        return Splits(
            **{
                f.name: {name: [r for recs in getattr(self, f.name).values() for r in recs]}
                for f in fields(self)
            }
        )

    def sizes(self) -> dict[str, dict[str, int]]:
        """Records per category and split, as ``sizes.json`` and the report name them (``labels``: the
        records to label)."""
        return {c: {name: len(getattr(self, f)[c]) for name, f in _SIZE_NAMES} for c in self.phase1}


_SIZE_NAMES = (
    ("phase1", "phase1"),
    ("labels", "to_label"),
    ("phase3", "phase3"),
    ("dev", "dev"),
    ("test", "test"),
)
"""(name in sizes.json, Splits field) in the order sizes.json lists them."""


def build_splits(
    records: Sequence[PreferenceRecord], categories: Sequence[str], config: DataConfig
) -> Splits:
    """Prompt-disjoint phases: train/dev/test by prompt, then train into phase 1 / phase 3 by prompt.

    The labelled records are drawn from phase 1, so nothing used in phase 1 or to derive capability labels
    is trained on in phase 3 or evaluated on (the paper's phases are disjoint; the authors' code swapped its
    train and validation splits).
    """
    train_share = round(1.0 - config.dev_share - config.test_share, 12)  # 0.8 exactly at the defaults
    shares = {"train": train_share, "dev": config.dev_share, "test": config.test_share}
    top = split_by_prompt(records, shares, seed=config.seed)
    halves = split_by_prompt(top["train"], {"phase1": 0.5, "phase3": 0.5}, seed=config.seed + 1)
    rng = random.Random(config.seed)  # one stream for every draw below, in this order
    phase1 = _take(halves["phase1"], categories, config.phase1_records, rng)
    phase3 = _take(halves["phase3"], categories, config.phase3_records, rng)
    if config.label_noise:
        phase1 = {c: with_label_noise(v, config.label_noise, config.seed) for c, v in phase1.items()}
        phase3 = {c: with_label_noise(v, config.label_noise, config.seed) for c, v in phase3.items()}
    return Splits(
        phase1=phase1,
        to_label={c: v[: config.label_records] for c, v in phase1.items()},
        phase3=phase3,
        dev=_take(top["dev"], categories, config.dev_records, rng),
        test=_take(top["test"], categories, config.test_records, rng),
    )


def _take(
    records: Sequence[PreferenceRecord], categories: Sequence[str], n: int, rng: random.Random
) -> dict[str, list[PreferenceRecord]]:
    """``n`` records per category drawn with ``rng`` (shuffled, then the first ``n``)."""
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
    out = {}
    for c in categories:
        pool = list(by_cat.get(c, []))
        rng.shuffle(pool)
        out[c] = pool[:n]
    return out


def load_preferences(config: DataConfig, taxonomy) -> list[PreferenceRecord]:
    """Load every preference source and map its labels onto the taxonomy's categories."""
    out: list[PreferenceRecord] = []
    for name in config.sources:
        records = load_data(name, config.data_dir)
        if not records:
            raise ValueError(f"data.sources: {name}: no preference records; is the file empty or blank?")
        out.extend(assign_categories(records, taxonomy))
    return out


def held_out_prompts(splits: Splits) -> set[tuple]:
    """Prompt keys of phase 3, dev and test: no capability label on them may train an expert."""
    return {
        conversation_key(r.conversation)
        for split in (splits.phase3, splits.dev, splits.test)
        for recs in split.values()
        for r in recs
    }
