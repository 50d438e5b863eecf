"""Does keeping length out of the reward cost agreement? The single reward model with and without the option.

Trains the single reward model (:func:`dmoerm.training.single.train_reward_model`) on a small subset of the
bundled RMB pairwise data once per ``--penalties`` value (``TrainConfig.length_penalty``; 0 is the plain
ranking loss), with one shared :class:`~dmoerm.training.trunk_cache.TrunkCache` so the frozen trunk runs once per
input, then scores the same held-back pairs with each model and prints raw agreement, the length-controlled
agreements and the reward-length correlations side by side (:func:`dmoerm.evaluation.compute_metrics`).

Records are drawn at random (``--seed``) from ``rmb/pairwise`` mapped onto the default taxonomy, keeping only
those whose every response fits in ``--max-length`` tokens untruncated (a truncated response's length is not
what the model sees). Train, dev (early stopping) and test records are disjoint.

    .venv/bin/python benchmarks/bench_length.py                      # defaults: 200/40/160 pairs, 0 vs 1
    .venv/bin/python benchmarks/bench_length.py --penalties 0 1 3 --json /tmp/bench_length.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmoerm.data import load_source
from dmoerm.encoding import encode_record
from dmoerm.evaluation import compute_metrics, length_table
from dmoerm.experts import BackboneConfig
from dmoerm.reward_model import RewardModel
from dmoerm.taxonomy import assign_categories, load_taxonomy
from dmoerm.training.loop import TrainConfig, score_items
from dmoerm.training.single import train_reward_model
from dmoerm.training.trunk_cache import TrunkCache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="rmb/pairwise", help="bundled source or group (default rmb/pairwise)")
    ap.add_argument("--train", type=int, default=200, help="training records (pairs)")
    ap.add_argument("--dev", type=int, default=40, help="dev records for early stopping")
    ap.add_argument("--test", type=int, default=160, help="held-back test records")
    ap.add_argument("--max-length", type=int, default=256, help="token limit of prompt + response")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--penalties", type=float, nargs="+", default=[0.0, 1.0], help="length_penalty values")
    ap.add_argument("--backbone", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples of the intervals")
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t_start = time.perf_counter()

    model_config = BackboneConfig(backbone=args.backbone, max_length=args.max_length)
    torch.manual_seed(args.seed)
    first = RewardModel.create(model_config)
    tok = first.tokenizer

    records = assign_categories(load_source(args.source), load_taxonomy("default"))
    rng = random.Random(args.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    need = args.train + args.dev + args.test
    chosen, items = [], []
    for i in order:
        rec = records[i]
        item = encode_record(tok, rec, 10**9)  # untruncated, to see whether it fits
        if not item.pairs or any(len(e.input_ids) > args.max_length for e in item.inputs):
            continue
        chosen.append(rec)
        items.append(item)
        if len(chosen) == need:
            break
    if len(chosen) < need:
        raise SystemExit(f"only {len(chosen)} records of {args.source} fit in {args.max_length} tokens")
    train, dev, test = (
        chosen[: args.train],
        chosen[args.train : args.train + args.dev],
        chosen[args.train + args.dev :],
    )
    test_items = items[args.train + args.dev :]
    test_tokens = [[len(e.input_ids) - e.prompt_length for e in item.inputs] for item in test_items]

    def longer_wins(recs):
        pairs = [(len(r.responses[b]), len(r.responses[w])) for r in recs for b, w in r.pairs()]
        return sum(1.0 if b > w else 0.5 if b == w else 0.0 for b, w in pairs) / len(pairs)

    print(
        f"{args.source}: {len(train)} train / {len(dev)} dev / {len(test)} test records that fit in "
        f"{args.max_length} tokens (seed {args.seed}); longer-wins rule agrees on {longer_wins(train):.3f} of "
        f"train and {longer_wins(test):.3f} of test pairs",
        flush=True,
    )

    cache = TrunkCache()
    # Every input's trunk states once, up front. (train_reward_model's ``cache or TrunkCache()`` would also
    # replace an empty cache, which is falsy through __len__, by a private one.)
    cache.get(first.bank, [e for item in items for e in item.inputs])
    results, figures = {}, {}
    for k, penalty in enumerate(args.penalties):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = first if k == 0 else RewardModel.create(model_config)
        train_config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            length_penalty=penalty,
        )
        with tempfile.TemporaryDirectory() as out:
            model, result = train_reward_model(
                train,
                dev,
                model_config,
                train_config,
                Path(out) / "rm",
                cache=cache,
                model=model,
                progress=False,
            )
        rewards = score_items(model.bank, RewardModel.EXPERT, test_items, cache)
        name = f"length_penalty={penalty:g}"
        res = compute_metrics(
            rewards,
            test,
            token_lengths=test_tokens,
            n_resamples=args.n_resamples,
            seed=args.seed,
            system=name,
        )
        results[name] = res
        o = res.overall
        figures[name] = {
            "length_penalty": penalty,
            "agreement": o.agreement.value,
            "agreement_ci": [o.agreement.ci_low, o.agreement.ci_high],
            "longer_wins_baseline": o.length.longer_wins_baseline.value,
            "when_shorter_better": o.length.when_shorter_better.value,
            "when_shorter_better_n": o.length.when_shorter_better.n,
            "when_longer_better": o.length.when_longer_better.value,
            "when_longer_better_n": o.length.when_longer_better.n,
            "pearson_chars": o.length.pearson_chars,
            "pearson_chars_within_prompt": o.length.pearson_chars_within_prompt,
            "pearson_tokens": o.length.pearson_tokens,
            "best_dev_agreement": result.best_dev_agreement if result else None,
            "steps": result.steps if result else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{name}: test agreement {o.agreement.value:.3f}, r(reward, tokens) {o.length.pearson_tokens:+.3f}, "
            f"{figures[name]['seconds']} s (trunk cache {cache.hits} hits, {cache.misses} misses)",
            flush=True,
        )

    print()
    print(length_table(results))
    total = round(time.perf_counter() - t_start, 1)
    print(f"total {total} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": figures, "seconds": total}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
