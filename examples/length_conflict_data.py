"""A preference set whose categories' annotators disagree, built from real RMB labels (a stress test, issue 13).

On RMB as it is, every category's annotators reward much the same things, and a category's inner model has
nothing to learn that the pooled single RM does not (README, "Where it stands"). This script writes the
situation DMoERM is built for: in the ``--concise`` categories only the pairs whose human-chosen answer is the
shorter one are kept; every other category keeps all its pairs, where the longer answer mostly wins. No label
is changed: every pair is an RMB pair with its human ranking; the selection makes the categories' preferences
on length conflict, as when one team's annotators want terse rewrites and code while another's want rich chat.

    python examples/length_conflict_data.py --out runs/conflict/rmb_length_conflict.jsonl
    dmoerm train --config configs/conflict.yaml

Prints the kept pairs per category. The output is derived data for a run folder (it is not committed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from dmoerm.data import PreferenceRecord, save_jsonl
from dmoerm.pipeline.config import DataConfig
from dmoerm.pipeline.splits import load_preferences
from dmoerm.taxonomy import load_taxonomy

CONCISE = ("code", "objective_qa", "reasoning", "rewriting")


def shorter_chosen(record: PreferenceRecord) -> bool:
    """An untied pair whose best-ranked response has fewer characters than the other."""
    if len(record.responses) != 2 or record.ranks[0] == record.ranks[1]:
        return False
    best, worse = sorted(range(2), key=lambda i: record.ranks[i])
    return len(record.responses[best]) < len(record.responses[worse])


def conflict_records(records: list[PreferenceRecord], concise: set[str]) -> list[PreferenceRecord]:
    """Records of the ``concise`` categories whose chosen answer is the shorter, and every other category's."""
    return [r for r in records if r.category is not None and (r.category not in concise or shorter_chosen(r))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL to write (the user preference schema)")
    parser.add_argument("--sources", nargs="+", default=["rmb/pairwise"], help="bundled preference sources")
    parser.add_argument("--concise", nargs="+", default=list(CONCISE), help="categories where shorter wins")
    parser.add_argument("--data-dir", default=None, help="bundled data folder (default ../shared/data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    taxonomy = load_taxonomy("default")
    unknown = set(args.concise) - set(taxonomy.category_names)
    if unknown:
        parser.error(f"--concise: {', '.join(sorted(unknown))} not in the default taxonomy")
    records = load_preferences(DataConfig(sources=args.sources, data_dir=args.data_dir), taxonomy)
    kept = conflict_records(records, set(args.concise))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_jsonl(kept, args.out)
    counts = Counter(r.category for r in kept)
    for category in sorted(counts):
        rule = "shorter chosen" if category in args.concise else "all"
        print(f"{category}: {counts[category]} pairs ({rule})")
    print(f"{len(kept)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
