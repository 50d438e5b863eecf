"""What the backbone's likelihood term (``likelihood.fit``) buys, and whether DMoERM's mixture has anything to do
with it: on a run's own test pairs,

    python examples/likelihood_term.py runs/lk/t100-n24-global

prints, each against the run's single RM (paired bootstrap 95% interval) and split by which answer is longer:

* the term alone (the backbone's mean log-probability of the response, with the run's fitted sign),
* the single RM plus the same term, its weight fitted as the run fitted DMoERM's (``global``: one weight on
  every dev pair, the single RM's own margins as offset; ``dmoerm.likelihood.fit_pair_weight``),
* the run's DMoERM (with the term it was saved with).

The second row is the fair control: a gain DMoERM shares with it comes from the term, not from the mixture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_difference import by_length, outcomes, pair_outcomes, paired_difference, run_arguments  # noqa: E402, I001


def single_rm_with_term(baseline, dev, test, cache, bound: float):
    """(the single RM's test rewards plus the term at the weight fitted on dev, that weight, the term on test)."""
    from dmoerm.encoding import encode_record
    from dmoerm.likelihood import fit_pair_weight
    from dmoerm.pipeline.evaluate import score_cached
    from dmoerm.scoring import flatten, response_likelihoods

    def scored(records):
        items = [encode_record(baseline.tokenizer, r, baseline.max_length) for r in records]
        flat, where = flatten(items)
        rewards = score_cached(baseline, flat, cache)[0]
        return items, rewards, response_likelihoods(baseline.bank, flat, cache), where

    items, reward, like, where = scored(dev)
    rows = [  # as dmoerm.likelihood.fit_likelihood_weights weighs them: an item's weight over its pairs
        (float(reward[s][b] - reward[s][w]), float(like[s][b] - like[s][w]), item.weight / len(item.pairs))
        for item, s in zip(items, where)
        for b, w in item.pairs
    ]
    o, d, w = (torch.tensor([x[i] for x in rows], dtype=torch.float64) for i in range(3))
    weight = fit_pair_weight(d, o, w, bound)
    _, reward, like, where = scored(test)
    return reward + weight * like, weight, like, where


def _row(name: str, a, b, resamples: int) -> str:
    keep = [k for k, x in enumerate(a) if x]  # records with a pair in this subset
    a, b = [a[k] for k in keep], [b[k] for k in keep]
    if not a:
        return f"{name}: no pairs"
    d, lo, hi = paired_difference(a, b, resamples)
    return f"{name}: {100 * sum(map(sum, a)) / sum(map(len, a)):.1f} vs single RM {d:+.1f} [{lo:+.1f}, {hi:+.1f}] ({sum(map(len, a))} pairs)"


def main(argv: list[str]) -> int:
    from dmoerm.data import load_data
    from dmoerm.model import load_model
    from dmoerm.pipeline.config import PipelineConfig

    args, cache = run_arguments(argv, __doc__)
    for run in map(Path, args.runs):
        config = PipelineConfig.from_file(run / "config.yaml")
        test = [r for r in load_data(str(run / "splits" / "test.jsonl")) if r.pairs()]
        dev = [r for r in load_data(str(run / "splits" / "dev.jsonl")) if r.pairs()]
        baseline, model = load_model(run / "baseline"), load_model(run / "model")
        rm = pair_outcomes(baseline, test, cache)
        with_term, weight, like, where = single_rm_with_term(
            baseline, dev, test, cache, config.likelihood.max_weight
        )
        sign = 1.0 if weight >= 0 else -1.0
        print(
            f"{run}: DMoERM's weights {model.likelihood_weights}; the single RM's, fitted alike, {weight:+.4f}"
        )
        for name, a in (
            ("the term alone", outcomes(test, sign * like, where)),
            ("single RM + term", outcomes(test, with_term, where)),
            ("DMoERM", pair_outcomes(model, test, cache)),
        ):
            print(_row(f"  {name}", a, rm, args.resamples))
            for part, sa, sb in zip(
                ("shorter better", "longer better"), by_length(test, a), by_length(test, rm)
            ):
                print(_row(f"    {part}", sa, sb, args.resamples))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
