"""Paired bootstrap of the agreement difference between a run's DMoERM and its single RM on the run's own test
pairs (the same pairs for both, resampled by record), e.g. for the scaling study's runs:

    python examples/paired_difference.py runs/scaling/n384_seed0 runs/scaling/n384_seed1

Prints, per run, DMoERM agreement, single RM agreement and the difference with its 95% interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def pair_outcomes(model, records, cache) -> list[list[float]]:
    """Per record, 1 / 0.5 / 0 for each untied pair ranked as the human did (reward ties count half)."""
    from dmoerm.encoding import encode_record
    from dmoerm.pipeline.evaluate import score_cached
    from dmoerm.scoring import flatten

    flat, where = flatten([encode_record(model.tokenizer, r, model.max_length) for r in records])
    rewards, _, _ = score_cached(model, flat, cache)
    out = []
    for r, span in zip(records, where):
        rw = rewards[span].tolist()
        out.append([1.0 if rw[b] > rw[w] else 0.5 if rw[b] == rw[w] else 0.0 for b, w in r.pairs()])
    return out


def main(argv: list[str]) -> int:
    from dmoerm.data import load_data
    from dmoerm.model import load_model
    from dmoerm.training.trunk_cache import TrunkCache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of `dmoerm train` (model/, baseline/, splits/)")
    parser.add_argument("--trunk-cache-dir", default="runs/trunk-cache", help="the runs' on-disk trunk cache")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    cache = TrunkCache(6 << 30, args.trunk_cache_dir)
    for run in map(Path, args.runs):
        records = [r for r in load_data(str(run / "splits" / "test.jsonl")) if r.pairs()]
        a = pair_outcomes(load_model(run / "model"), records, cache)
        b = pair_outcomes(load_model(run / "baseline"), records, cache)
        sa, sb = np.array([sum(x) for x in a]), np.array([sum(x) for x in b])
        n = np.array([len(x) for x in a])
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(n), size=(args.resamples, len(n)))  # records resampled, both systems alike
        diff = (sa[idx].sum(1) - sb[idx].sum(1)) / n[idx].sum(1)
        lo, hi = np.percentile(100 * diff, [2.5, 97.5])
        print(
            f"{run}: DMoERM {100 * sa.sum() / n.sum():.1f}, single RM {100 * sb.sum() / n.sum():.1f}, "
            f"difference {100 * (sa.sum() - sb.sum()) / n.sum():+.1f} [{lo:+.1f}, {hi:+.1f}] ({n.sum()} pairs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
