"""How much of DMoERM's gap to the single RM is routing? A run's DMoERM scored twice on its own test pairs: with
the router's choice (as `dmoerm train` evaluates it) and with every record sent to its labelled category's inner
model (an oracle router), beside the run's single RM, each with a paired bootstrap against the single RM:

    python examples/oracle_routing.py runs/scaling-test100/n384_seed0 runs/scaling-test100/n384_seed1

Prints, per run, the router's test routing agreement and the three agreements with their differences.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def oracle_rewards(model, records, flat, where, cache) -> torch.Tensor:
    """Rewards [N] with each record's responses scored by its own category's inner model (no router): the
    evaluation's "DMoERM, labelled category"."""
    from dmoerm.pipeline.evaluate import score_cached

    category = [r.category for r, span in zip(records, where) for _ in range(span.start, span.stop)]
    return score_cached(model, flat, cache, categories=category)[0]


def main(argv: list[str]) -> int:
    from paired_difference import (  # examples/, beside this script
        agreement,
        outcomes,
        paired_difference,
        run_arguments,
    )

    from dmoerm.data import load_data
    from dmoerm.encoding import encode_record
    from dmoerm.model import load_model
    from dmoerm.pipeline.evaluate import score_cached
    from dmoerm.scoring import flatten

    args, cache = run_arguments(argv, __doc__)
    for run in map(Path, args.runs):
        records = [r for r in load_data(str(run / "splits" / "test.jsonl")) if r.pairs() and r.category]
        model, single = load_model(run / "model"), load_model(run / "baseline")
        flat, where = flatten([encode_record(model.tokenizer, r, model.max_length) for r in records])
        routed, category, _ = score_cached(model, flat, cache)
        agree = np.mean([category[span.start] == r.category for r, span in zip(records, where)])
        base = outcomes(records, score_cached(single, flat, cache)[0], where)
        line = [f"{run}: routing agreement {100 * agree:.1f}%, single RM {agreement(base):.1f}"]
        for name, rewards in (
            ("routed", routed),
            ("oracle-routed", oracle_rewards(model, records, flat, where, cache)),
        ):
            out = outcomes(records, rewards, where)
            d, lo, hi = paired_difference(out, base, args.resamples)
            line.append(f"DMoERM {name} {agreement(out):.1f} ({d:+.1f} [{lo:+.1f}, {hi:+.1f}])")
        print(", ".join(line) + f" ({sum(map(len, base))} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
