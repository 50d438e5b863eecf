"""Train a small single reward model for the GRPO example (a few minutes on a 2-core CPU).

It samples short single-turn pairs (prompt + longer response under ``--max-chars`` characters, no ties) from a
bundled preference source, trains a single reward model (LoRA on the top layers of the default backbone,
SmolLM2-135M-Instruct) with :func:`dmoerm.training.single.train_reward_model`, then stores the reward
normalization measured on the dev pairs' responses (:func:`dmoerm.rl.normalize_model`).

    .venv/bin/python examples/train_small_reward_model.py --output-dir runs/rl/reward_model

A finished ``--output-dir`` is loaded, not retrained. Prefer a real model (``dmoerm train ...``) when you have
one; this is only a quick stand-in so the RL example has a learned reward to climb.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("train_small_reward_model")


def short_pairs(source: str, max_chars: int, n: int, seed: int) -> list:
    """``n`` random single-turn, untied records of ``source`` whose prompt + longest response is short."""
    from dmoerm.data import load_source

    records = [
        r
        for r in load_source(source)
        if len(r.conversation) == 1
        and not r.is_tie
        and len(r.conversation[0].content) + max(len(x) for x in r.responses) < max_chars
    ]
    if len(records) < n:
        raise SystemExit(f"{source}: only {len(records)} records under {max_chars} characters; lower --pairs")
    return random.Random(seed).sample(records, n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="rmb/pairwise_helpfulness", help="bundled preference source")
    p.add_argument("--pairs", type=int, default=400, help="records sampled (train + dev)")
    p.add_argument("--dev", type=int, default=60, help="of which held out for dev")
    p.add_argument("--max-chars", type=int, default=1000, help="prompt + longest response, in characters")
    p.add_argument("--max-length", type=int, default=256, help="token limit of one rendered pair")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/rl/reward_model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from dmoerm.experts import BackboneConfig
    from dmoerm.rl import NormalizeModelConfig, normalize_model
    from dmoerm.training.loop import TrainConfig
    from dmoerm.training.single import train_reward_model

    if args.threads:
        torch.set_num_threads(args.threads)
    records = short_pairs(args.source, args.max_chars, args.pairs, args.seed)
    dev, train = records[: args.dev], records[args.dev :]
    start = time.perf_counter()
    model, result = train_reward_model(
        train,
        dev,
        BackboneConfig(max_length=args.max_length),
        TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed),
        args.output_dir,
        progress=False,
    )
    if result is not None:
        logger.info(
            "trained in %.0f s: %d steps, best dev agreement %.3f",
            time.perf_counter() - start,
            result.steps,
            result.best_dev_agreement,
        )
    # Reference set for normalization: every response of the dev records (held out from training).
    reference = Path(args.output_dir) / "normalization_reference.jsonl"
    from dmoerm.data import save_jsonl

    save_jsonl(dev, reference)
    norm = normalize_model(NormalizeModelConfig(model_dir=args.output_dir, source=str(reference)))
    logger.info("normalization: mean %.4f std %.4f over %d responses", norm.mean, norm.std, norm.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
