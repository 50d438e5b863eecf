"""GRPO (TRL) on a small generator with a dmoerm reward, sized for a 2-core CPU (a few minutes).

The policy is SmolLM2-135M-Instruct (bundled with dmoerm; or ``--generator PATH``). The reward is, in order of
preference:

* ``--reward-url URL``: a running dmoerm reward server (``dmoerm.serving``), through ``POST /score``;
* ``--reward-model DIR``: a trained dmoerm reward model directory, scored in this process;
* neither: a rule-based demonstration reward (answers of about ``--target-words`` words that end a
  sentence score highest), so the example runs without a trained reward model.

Rewards from a reward model are normalized with ``DIR/reward_normalization.json`` when it exists
(:func:`dmoerm.rl.compute_normalization`). The mean reward of each step is written to
``OUTPUT/reward_curve.csv`` and plotted in ``OUTPUT/reward_curve.png``.

    .venv/bin/python examples/grpo_example.py                         # rule-based reward, 16 steps
    .venv/bin/python examples/grpo_example.py --reward-model runs/rm  --steps 20
    .venv/bin/python examples/grpo_example.py --reward-url http://127.0.0.1:8000 --token "$TOKEN"

Requires ``trl`` (``pip install trl``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("grpo_example")

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Why is the sky blue?",
    "Name a good book for learning Python.",
    "How do I boil an egg?",
    "What does a reward model do?",
    "Suggest a name for a grey cat.",
    "What is 12 times 12?",
    "How can I stay focused while studying?",
    "Explain what a prime number is.",
    "What should I pack for a day hike?",
    "Write a one-line greeting for a birthday card.",
]


def rule_reward_fn(target_words: int):
    """Demonstration reward: close to ``target_words`` words, and ends with . ! or ? (max 1.0)."""

    def rule_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        from dmoerm.rl import completion_text

        out = []
        for completion in completions:
            text = completion_text(completion).strip()
            words = len(text.split())
            length = max(0.0, 1.0 - abs(words - target_words) / target_words)
            ending = 0.25 if text.endswith((".", "!", "?")) else 0.0
            out.append(0.75 * length + ending)
        return out

    return rule_reward


def load_scorer(path: str):
    """A trained dmoerm reward model (single or DMoERM) from its directory."""
    from dmoerm.model import load_model

    return load_model(path)


def resolve_generator(name: str | None) -> str:
    from dmoerm.backbone import resolve_backbone

    return resolve_backbone(name)


def freeze_below_top(model, top: int) -> None:
    """Train only the top ``top`` decoder layers and the final norm; freeze embeddings and the layers below."""
    layers = model.model.layers
    if not 0 < top <= len(layers):
        raise SystemExit(f"--train-top-layers: must be in 1..{len(layers)}, got {top}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - top :]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training the top %d of %d layers: %.1fM parameters", top, len(layers), trainable / 1e6)


def save_curve(rows: list[dict[str, float]], out_dir: Path, title: str) -> None:
    csv_path = out_dir / "reward_curve.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "mean_reward", "reward_std", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    means = [r["mean_reward"] for r in rows]
    stds = [r["reward_std"] for r in rows]
    ax.plot(steps, means, marker="o", ms=3, label="mean reward")
    ax.fill_between(
        steps,
        [m - s for m, s in zip(means, stds, strict=True)],
        [m + s for m, s in zip(means, stds, strict=True)],
        alpha=0.2,
    )
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "reward_curve.png", dpi=120)
    plt.close(fig)
    logger.info("wrote %s and %s", csv_path, out_dir / "reward_curve.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--generator", help="policy model folder or hub id (default: bundled SmolLM2-135M-Instruct)"
    )
    p.add_argument("--reward-model", help="a trained dmoerm reward model directory")
    p.add_argument("--reward-url", help="a dmoerm reward server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--token", default=os.environ.get("DMOERM_TOKEN"), help="server bearer token ($DMOERM_TOKEN)"
    )
    p.add_argument("--no-normalize", action="store_true", help="use raw reward model scores")
    p.add_argument("--target-words", type=int, default=12, help="rule-based reward: ideal answer length")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument(
        "--num-prompts",
        type=int,
        default=len(PROMPTS),
        help=f"train on the first N of the {len(PROMPTS)} built-in prompts (with N = --prompts-per-step every "
        "step sees the same prompts, so the step means are comparable)",
    )
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO group size)")
    p.add_argument("--max-completion-length", type=int, default=32, help="tokens per completion")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0 skips the reference model)")
    p.add_argument(
        "--train-top-layers",
        type=int,
        default=4,
        help="train only the top N decoder layers and the final norm (0: the whole model); on a small CPU "
        "this cuts the backward pass several times",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/rl")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    try:
        import datasets
        import torch
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    except ImportError as exc:
        print(f"this example needs trl and datasets: pip install trl ({exc})", file=sys.stderr)
        return 1
    from dmoerm.rl import make_reward_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.reward_url:
        reward = make_reward_fn(args.reward_url, token=args.token, normalize=not args.no_normalize)
        reward_desc = f"reward server {args.reward_url}"
    elif args.reward_model:
        scorer = load_scorer(args.reward_model)
        reward = make_reward_fn(scorer, model_dir=args.reward_model, normalize=not args.no_normalize)
        reward_desc = f"reward model {args.reward_model}"
    else:
        reward = rule_reward_fn(args.target_words)
        reward_desc = f"rule-based reward (~{args.target_words} words, ends a sentence)"

    generator = resolve_generator(args.generator)
    logger.info("policy %s; %s", generator, reward_desc)
    tokenizer = AutoTokenizer.from_pretrained(generator)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(generator, dtype=torch.float32)
    if args.train_top_layers:
        freeze_below_top(model, args.train_top_layers)

    batch = args.prompts_per_step * args.num_generations
    if not 1 <= args.num_prompts <= len(PROMPTS):
        p.error(f"--num-prompts: must be in 1..{len(PROMPTS)}")
    data = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q}]} for q in PROMPTS[: args.num_prompts]]
    )
    config = trl.GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=batch,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        disable_tqdm=True,
        gradient_checkpointing=False,  # TRL's default recomputes activations: slower, and memory is not short
    )

    rows: list[dict[str, float]] = []
    start = time.perf_counter()

    class CurveCallback(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rows.append(
                    {
                        "step": state.global_step,
                        "mean_reward": float(logs["reward"]),
                        "reward_std": float(logs.get("reward_std", 0.0)),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                logger.info("step %d: mean reward %.4f", state.global_step, logs["reward"])
                save_curve(rows, out_dir, f"GRPO, {reward_desc}")  # kept up to date if interrupted

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[CurveCallback()],
    )
    trainer.train()
    wall = time.perf_counter() - t_start
    if rows:
        first, last = rows[0]["mean_reward"], rows[-1]["mean_reward"]
        k = max(1, len(rows) // 5)
        head = sum(r["mean_reward"] for r in rows[:k]) / k
        tail = sum(r["mean_reward"] for r in rows[-k:]) / k
        logger.info(
            "%d steps in %.0f s (%.0f s wall with loading); mean reward first %.3f last %.3f "
            "(mean of the first/last %d steps: %.3f -> %.3f)",
            len(rows),
            time.perf_counter() - start,
            wall,
            first,
            last,
            k,
            head,
            tail,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
