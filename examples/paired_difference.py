"""Paired bootstrap of the agreement difference between a run's DMoERM and its single RM on the run's own test
pairs (the same pairs for both, resampled by record), e.g. for the scaling study's runs:

    python examples/paired_difference.py runs/scaling/n384_seed0 runs/scaling/n384_seed1

Prints, per run, DMoERM agreement, single RM agreement and the difference with its 95% interval, then the same
on the pairs whose better response is the shorter one (in characters) and on those where it is the longer.
``--against RUN`` compares each run's DMoERM with the single RM of another run trained on the same splits
(e.g. a run with ``phase1.length_covariate`` against the main job's plain single RM); the test records must be
the same, or it stops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def outcomes(records, rewards, where) -> list[list[float]]:
    """Per record, 1 / 0.5 / 0 for each untied pair ranked as the human did (reward ties count half), from the
    rewards [N] of the records' responses flattened in order (``where``: each record's slice)."""
    out = []
    for r, span in zip(records, where):
        rw = rewards[span].tolist()
        out.append([1.0 if rw[b] > rw[w] else 0.5 if rw[b] == rw[w] else 0.0 for b, w in r.pairs()])
    return out


def pair_outcomes(model, records, cache) -> list[list[float]]:
    """:func:`outcomes` of ``model``'s rewards, scored as the pipeline's evaluation scores them."""
    from dmoerm.encoding import encode_record
    from dmoerm.pipeline.evaluate import score_cached
    from dmoerm.scoring import flatten

    flat, where = flatten([encode_record(model.tokenizer, r, model.max_length) for r in records])
    return outcomes(records, score_cached(model, flat, cache)[0], where)


def paired_difference(a, b, resamples: int = 2000) -> tuple[float, float, float]:
    """Agreement of ``a`` minus that of ``b`` (points) and its 95% interval, resampling records for both alike."""
    sa, sb = np.array([sum(x) for x in a]), np.array([sum(x) for x in b])
    n = np.array([len(x) for x in a])
    idx = np.random.default_rng(0).integers(0, len(n), size=(resamples, len(n)))
    diff = 100 * (sa[idx].sum(1) - sb[idx].sum(1)) / n[idx].sum(1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return 100 * (sa.sum() - sb.sum()) / n.sum(), lo, hi


def agreement(a) -> float:
    """Agreement (%) over every pair of :func:`outcomes`."""
    return 100 * sum(map(sum, a)) / sum(map(len, a))


def by_length(records, a) -> tuple[list[list[float]], list[list[float]]]:
    """:func:`outcomes` ``a`` split into (pairs whose better response is the shorter, is the longer), per record;
    pairs of equal length in characters are left out, as the evaluation's length controls leave them."""
    shorter, longer = [], []
    for r, o in zip(records, a, strict=True):
        sizes = [(len(r.responses[b]), len(r.responses[w])) for b, w in r.pairs()]
        shorter.append([x for x, (lb, lw) in zip(o, sizes) if lb < lw])
        longer.append([x for x, (lb, lw) in zip(o, sizes) if lb > lw])
    return shorter, longer


def run_arguments(argv: list[str], doc: str):
    """(arguments, trunk cache) of a script over run folders: ``runs``, ``--trunk-cache-dir``, ``--resamples``."""
    from dmoerm.training.trunk_cache import TrunkCache

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of `dmoerm train` (model/, baseline/, splits/)")
    parser.add_argument("--trunk-cache-dir", default="runs/trunk-cache", help="the runs' on-disk trunk cache")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--against", help="compare with this run's single RM instead of each run's own")
    args = parser.parse_args(argv)
    return args, TrunkCache(6 << 30, args.trunk_cache_dir)


def _line(name: str, a, b, resamples: int) -> str:
    keep = [k for k, x in enumerate(a) if x]  # records with a pair in this subset
    a, b = [a[k] for k in keep], [b[k] for k in keep]
    d, lo, hi = paired_difference(a, b, resamples)
    return (
        f"{name}: DMoERM {agreement(a):.1f}, single RM {agreement(b):.1f}, "
        f"difference {d:+.1f} [{lo:+.1f}, {hi:+.1f}] ({sum(map(len, a))} pairs)"
    )


def main(argv: list[str]) -> int:
    from dmoerm.data import load_data
    from dmoerm.model import load_model

    args, cache = run_arguments(argv, __doc__)
    for run in map(Path, args.runs):
        records = [r for r in load_data(str(run / "splits" / "test.jsonl")) if r.pairs()]
        other = Path(args.against) if args.against else run
        if other != run:
            theirs = [r.uid for r in load_data(str(other / "splits" / "test.jsonl")) if r.pairs()]
            if theirs != [r.uid for r in records]:
                raise SystemExit(f"{other}/splits/test.jsonl: not the test records of {run}")
        a = pair_outcomes(load_model(run / "model"), records, cache)
        b = pair_outcomes(load_model(other / "baseline"), records, cache)
        label = f"{run}" if other == run else f"{run} against {other}'s single RM"
        print(_line(label, a, b, args.resamples))
        for name, sa, sb in zip(
            ("  shorter better", "  longer better"), by_length(records, a), by_length(records, b)
        ):
            print(_line(name, sa, sb, args.resamples))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
