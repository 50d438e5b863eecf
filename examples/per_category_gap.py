"""Where DMoERM gains or loses against the single RM, per category: from each run's saved evaluation
(``eval/<system>/eval.json``, no rescoring), the agreement difference (points) of DMoERM and of the routed
per-category phase-1 models against the run's single RM, category by category:

    python examples/per_category_gap.py runs/scaling-test100/n384_seed0 runs/scaling-test100/n384_seed1

The second number isolates phase 1's specialisation (router + each category's phase-1 model); DMoERM minus it
is what phases 2 and 3 (capability experts, aggregator) add. Prints a Markdown table, one row per category,
one column per run, and the mean over runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SYSTEMS = {"DMoERM": "DMoERM", "per-category RMs": "per_category_RMs_routed", "single RM": "single_RM"}


def per_category(run: Path, folder: str) -> dict[str, float]:
    """Category -> agreement (%) of one system of a run."""
    data = json.loads((run / "eval" / folder / "eval.json").read_text())
    return {c["category"]: 100 * c["agreement"]["value"] for c in data["per_category"]}


def gaps(run: Path) -> dict[str, tuple[float, float]]:
    """Category -> (DMoERM - single RM, per-category RMs - single RM) in points."""
    got = {name: per_category(run, folder) for name, folder in SYSTEMS.items()}
    single = got["single RM"]
    return {c: (got["DMoERM"][c] - single[c], got["per-category RMs"][c] - single[c]) for c in sorted(single)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of `dmoerm train` (with eval/)")
    args = parser.parse_args(argv)
    table = {run.name: gaps(run) for run in args.runs}
    categories = sorted({c for g in table.values() for c in g})
    head = " | ".join(table)
    print(f"| category | {head} | mean |")
    print("|---|" + "---:|" * (len(table) + 1))
    for c in categories:
        cells = [table[r].get(c) for r in table]
        shown = [
            f"{d:+.1f} / {p:+.1f}" if d is not None else "-" for d, p in (x or (None, None) for x in cells)
        ]
        known = [x for x in cells if x is not None]
        mean = (sum(d for d, _ in known) / len(known), sum(p for _, p in known) / len(known))
        print(f"| {c} | {' | '.join(shown)} | {mean[0]:+.1f} / {mean[1]:+.1f} |")
    print("\nEach cell: DMoERM - single RM / per-category RMs (routed) - single RM, agreement points.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
