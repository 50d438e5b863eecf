"""The shared machinery of every phase: the pairwise ranking loop.

Only the top layers (with one expert's LoRA adapter) and its value head train, so the frozen trunk's states
are computed once per input and reused across phases, experts and epochs (the performance issue; see
:mod:`dmoerm.training.trunk_cache`); scoring goes through :mod:`dmoerm.scoring`.
Training runs through Hugging Face ``accelerate``: the same code runs on several processes (DDP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmoerm.encoding import EncodedInput, RankedItem, length_buckets
from dmoerm.scoring import expert_rewards, flatten, items_in_order, padded_states

# Moved to dmoerm.training.trunk_cache; importable from here too.
from dmoerm.training.trunk_cache import TrunkCache, pad_states, trunk_key  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one pairwise training run (phase 1, each phase-2 expert, a single model)."""

    learning_rate: float = 5e-4
    """AdamW learning rate of the adapter (or top layers) and value head."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 3
    """Passes over the training pairs (early stopping may end sooner)."""
    batch_size: int = 8
    """Records (each with two or more responses) per step and process."""
    gradient_accumulation_steps: int = 1
    """Steps whose gradients are summed before one optimizer update."""
    warmup_ratio: float = 0.1
    """Share of the updates with a linearly rising learning rate; linear decay after."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_every: int = 0
    """Evaluate on dev every this many updates; 0 evaluates at the end of each epoch."""
    early_stopping_patience: int = 2
    """Stop after this many dev evaluations without improvement (0 disables); the best weights are kept."""
    mixed_precision: str = "no"
    """``no`` or ``bf16`` (autocast of the top layers where the hardware supports it)."""
    seed: int = 0
    """Seed of initialisation order and batch shuffling."""
    length_penalty: float = 0.0
    """Weight of the length decorrelation penalty: ``length_penalty * corr(reward, response tokens)^2`` over
    the responses of each batch is added to the ranking loss (:func:`length_correlation_penalty`), so the
    reward cannot rank by length alone. 0 (the default) trains with the ranking loss exactly as before."""

    def __post_init__(self) -> None:
        check_length_penalty(self.length_penalty)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps: must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} is not 'no' or 'bf16'")


def ranking_loss(
    rewards: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -log sigmoid(r_better - r_worse) over pairs (the paper's loss over every untied pair).

    rewards: [N]; pairs: [P, 2] (better index, worse index) into rewards; weights: [P] or None -> scalar.
    """
    pairs = pairs.to(rewards.device)
    margin = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]  # [P]
    loss = -F.logsigmoid(margin)
    if weights is None:
        return loss.mean()
    weights = weights.to(rewards.device)
    return (loss * weights).sum() / weights.sum().clamp(min=1e-8)


# Keeping length out of the reward. Of the two methods the length-bias issue names, we use ODIN's
# correlation term (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", arXiv 2402.07319,
# whose quality head is trained with a Pearson-correlation-with-length penalty on each batch) without ODIN's
# second, length head. That head is dropped at inference anyway, and leaving it out means the models
# (ExpertBank, Aggregator), their forward passes and their saved files stay as they are: the option lives in
# the loss alone, works the same for every expert and the phase-3 aggregator, and costs one Pearson per batch.
# We square the correlation instead of ODIN's absolute value: within a batch of a few dozen responses the
# sample correlation is noisy (about 1/sqrt(N) even when the true one is 0), and |r| would push on that noise
# with full force around 0, while r^2 is smooth there and its expectation is minimised at a true 0.
def check_length_penalty(value: float, field_name: str = "length_penalty") -> None:
    """Raise ValueError naming ``field_name`` unless ``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name}: must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field_name}: must be a finite number >= 0, got {value}")


def response_lengths(inputs: Sequence[EncodedInput]) -> torch.Tensor:
    """Response length in tokens of each encoded input (tokens after the prompt, end marker included): [N]."""
    return torch.tensor([len(e.input_ids) - e.prompt_length for e in inputs], dtype=torch.float32)


def length_correlation(
    rewards: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Pearson correlation of rewards [N] with lengths [N], differentiable in rewards.

    With ``groups`` [N] (the item, i.e. prompt, of each response), rewards and lengths are first centred within
    their group, so the correlation is the within-prompt one (responses to different prompts are not compared).
    The reward variance has a floor of ``1e-4`` (a standard deviation of 0.01), so a nearly constant reward
    (e.g. a fresh value head) has a near-zero correlation instead of an exploding gradient. 0 when there are
    fewer than 3 responses or the lengths do not vary.
    """
    r = rewards.float()
    if r.numel() < 3:
        return r.sum() * 0.0  # keeps the graph (and the device) without moving anything
    n = lengths.to(r.device, torch.float32)
    if groups is None:
        r, n = r - r.mean(), n - n.mean()
    else:
        g = groups.to(r.device)
        size = torch.zeros(int(g.max()) + 1, device=r.device).index_add_(0, g, torch.ones_like(r))
        r = r - (torch.zeros_like(size).index_add(0, g, r) / size)[g]
        n = n - (torch.zeros_like(size).index_add_(0, g, n) / size)[g]
    den = torch.sqrt((r * r).mean() + 1e-4) * torch.sqrt((n * n).mean()).clamp(min=1e-6)
    return (r * n).mean() / den


def length_correlation_penalty(
    rewards: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """The length penalty: the squared :func:`length_correlation` of a batch's rewards with response lengths."""
    return length_correlation(rewards, lengths, groups) ** 2


def batch_items(bank, items: Sequence[RankedItem], cache: TrunkCache) -> dict[str, torch.Tensor]:
    """Flatten a batch of ranked items: trunk states [N, T, H], mask [N, T], pairs [P, 2], weights [P],
    response lengths in tokens [N] and the item each response belongs to [N]."""
    flat, where = flatten(items)
    pairs = [(rows.start + b, rows.start + w) for item, rows in zip(items, where) for b, w in item.pairs]
    # Each item weighs the same, however many pairs it has.
    weights = [item.weight / len(item.pairs) for item in items for _ in item.pairs]
    groups = [k for k, item in enumerate(items) for _ in item.inputs]
    states, mask, _ = padded_states(bank, flat, cache)
    return {
        "states": states,
        "attention_mask": mask,
        "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
        "weights": torch.tensor(weights, dtype=torch.float32),
        "lengths": response_lengths(flat),
        "groups": torch.tensor(groups, dtype=torch.long),
    }


def score_items(
    bank, expert: str, items: Sequence[RankedItem], cache: TrunkCache, batch_size: int = 16
) -> list[list[float]]:
    """Expert ``expert``'s reward of every response of every item (no gradients; ``batch_size`` items a batch)."""
    flat, where = flatten(items)
    rewards = expert_rewards(bank, expert, flat, cache, batches=items_in_order(where, batch_size)).tolist()
    return [rewards[rows] for rows in where]


def pair_agreement(items: Sequence[RankedItem], rewards: Sequence[Sequence[float]]) -> float:
    """Share of untied pairs ranked as labelled (reward ties count half)."""
    right = total = 0.0
    for item, r in zip(items, rewards, strict=True):
        for better, worse in item.pairs:
            total += 1
            right += 1.0 if r[better] > r[worse] else 0.5 if r[better] == r[worse] else 0.0
    return right / total if total else float("nan")


@dataclass
class TrainResult:
    """What a pairwise training run did."""

    steps: int = 0
    best_dev_agreement: float = float("nan")
    history: dict = field(
        default_factory=lambda: {"step": [], "loss": [], "dev_step": [], "dev_agreement": []}
    )
    stopped_early: bool = False


_ACCELERATOR = None


def process_accelerator():
    """The process's one ``Accelerator``, built on first use.

    accelerate keeps one state per process, so a second ``Accelerator`` with other settings (phase 1 in bf16,
    phase 2 in float32) fails; every training run shares this one and sets its own gradient accumulation, and
    mixed precision is an autocast around each forward pass (:func:`_autocast`).
    """
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator(cpu=not torch.cuda.is_available())
    return _ACCELERATOR


def _autocast(accelerator, mixed_precision: str):
    """bf16 autocast of the top layers when ``mixed_precision`` is ``bf16``; a no-op context otherwise."""
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


# ------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_FILE = "checkpoint.safetensors"
"""A training run's resume state: tensors in safetensors, everything else as JSON in its metadata (no pickle:
a run folder from someone else cannot execute code)."""
_META = "dmoerm_checkpoint"


def save_checkpoint(
    path: Path, params, optimizer, scheduler, epoch: int, result, best, bad_evals: int
) -> None:
    """Write the resume state atomically (one file: a kill leaves the previous epoch's intact)."""
    from safetensors.torch import save_file

    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    if best is not None:
        tensors.update({f"best.{i}": p.detach().cpu().contiguous() for i, p in enumerate(best)})
    opt = optimizer.state_dict()
    opt_state: dict[str, dict] = {}
    for idx, entry in opt["state"].items():
        opt_state[str(idx)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                opt_state[str(idx)][name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    meta = {
        "epoch": epoch,
        "result": asdict(result),
        "bad_evals": bad_evals,
        "has_best": best is not None,
        "optimizer": {"state": opt_state, "param_groups": opt["param_groups"]},
        "scheduler": scheduler.state_dict(),
        "rng_python": [version, list(internal), gauss],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, params, optimizer, scheduler) -> tuple[int, TrainResult, list | None, int]:
    """Restore params, optimizer, scheduler and RNGs from :func:`save_checkpoint`'s file; (epoch, result,
    best state, bad evaluations). A damaged file raises ``ValueError`` naming it and what to do."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        n = len(params)
        loaded = [tensors[f"param.{i}"] for i in range(n)]
        if f"param.{n}" in tensors or any(a.shape != b.shape for a, b in zip(loaded, params)):
            raise ValueError("its parameters do not match this expert's (another model or LoRA rank?)")
        best = [tensors[f"best.{i}"] for i in range(n)] if meta["has_best"] else None
        state = {}
        for idx, rest in meta["optimizer"]["state"].items():
            entry = dict(rest)
            prefix = f"optim.{idx}."
            entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(idx)] = entry
        with torch.no_grad():
            for p, v in zip(params, loaded, strict=True):
                p.copy_(v.to(p.device, p.dtype))
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["rng.torch"])
        result = TrainResult(**meta["result"])
        return meta["epoch"], result, best, meta["bad_evals"]
    except Exception as e:  # safetensors raises its own errors for a cut or garbled file
        raise ValueError(
            f"{path}: cannot resume from this training checkpoint ({type(e).__name__}: {e}); delete it to train "
            "this stage again from its first epoch"
        ) from None


def train_expert(
    bank,
    expert: str,
    train: Sequence[RankedItem],
    dev: Sequence[RankedItem],
    config: TrainConfig,
    cache: TrunkCache,
    checkpoint_dir: str | Path | None = None,
    desc: str | None = None,
    evaluate_first: bool = False,
) -> TrainResult:
    """Train expert ``expert`` (its adapter or the top layers, and its value head) with the ranking loss.

    With ``config.length_penalty`` > 0 the loss adds that weight times the squared correlation of the batch's
    rewards with response length (the logged loss is the sum).

    Exactly ``bank.expert_parameters(expert)`` change; everything else stays frozen. With ``checkpoint_dir``,
    the trainable weights, optimizer, scheduler and position are saved after each epoch, and a rerun resumes
    from there. The weights with the best dev agreement are restored at the end.
    """
    if not train:
        raise ValueError(f"{expert}: no training items")
    accelerator = process_accelerator()
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    torch.manual_seed(config.seed)
    bank.requires_grad_(False)
    params = bank.expert_parameters(expert)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    updates = max(1, math.ceil(batches_per_epoch * config.epochs / config.gradient_accumulation_steps))
    warmup = int(config.warmup_ratio * updates)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (updates - step) / max(1, updates - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(bank, optimizer, scheduler)

    # Trunk states of every input, once (length-bucketed); epochs and dev evaluations reuse them.
    cache.get(
        bank, [e for item in list(train) + list(dev) for e in item.inputs], desc=desc and f"{desc} trunk"
    )

    result = TrainResult()
    start_epoch, best_state, bad_evals = 0, None, 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if ckpt is not None and (ckpt.parent / "checkpoint.pt").exists():
        logger.warning(
            "%s: ignoring checkpoint.pt of an older version (pickles are never loaded)", ckpt.parent
        )
    if ckpt is not None and ckpt.exists():
        start_epoch, result, best_state, bad_evals = load_checkpoint(ckpt, params, optimizer, scheduler)
        logger.info("%s: resumed from %s at epoch %d", expert, ckpt, start_epoch)

    def evaluate() -> None:
        nonlocal best_state, bad_evals
        if not dev:
            return
        agreement = pair_agreement(dev, score_items(bank, expert, dev, cache))
        result.history["dev_step"].append(result.steps)
        result.history["dev_agreement"].append(agreement)
        logger.info("%s: step %d dev agreement %.4f", expert, result.steps, agreement)
        if not agreement <= result.best_dev_agreement:  # also true for the first (nan) comparison
            result.best_dev_agreement = agreement
            best_state = [p.detach().clone() for p in params]
            bad_evals = 0
        else:
            bad_evals += 1

    order_rng = random.Random(config.seed)
    lengths = [sum(len(e.input_ids) for e in item.inputs) for item in train]
    stop = result.stopped_early
    corr_sum = corr_n = 0.0
    if evaluate_first and not result.history["dev_step"]:
        evaluate()  # the starting weights (a warm start) are the first candidate for "best on dev"
    for epoch in range(start_epoch, config.epochs):
        if stop:
            break
        order_rng.seed(config.seed + epoch)
        batches = length_buckets(lengths, config.batch_size)
        order_rng.shuffle(batches)
        # Each process takes its share of the batches (accelerate's DDP averages the gradients); every
        # process must run the same number of steps, or DDP waits forever for the missing one.
        world = accelerator.num_processes
        if world > 1:
            batches = batches[: max(world, len(batches) // world * world)]
            batches = (batches * world)[: max(len(batches), world)]
        batches = batches[accelerator.process_index :: world]
        model.train()
        bar = tqdm(batches, desc=f"{desc or expert} epoch {epoch + 1}/{config.epochs}", disable=desc is None)
        for idx in bar:
            batch = batch_items(bank, [train[i] for i in idx], cache)
            if batch["pairs"].numel() == 0:
                continue
            with accelerator.accumulate(model):
                with _autocast(accelerator, config.mixed_precision):
                    rewards = model(batch["states"], batch["attention_mask"], expert)  # [N]
                loss = ranking_loss(rewards.float(), batch["pairs"], batch["weights"])
                if config.length_penalty > 0:
                    corr = length_correlation(rewards, batch["lengths"], batch["groups"])
                    loss = loss + config.length_penalty * corr**2  # = length_correlation_penalty
                    corr_sum, corr_n = corr_sum + corr.item(), corr_n + 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            result.steps += 1
            result.history["step"].append(result.steps)
            result.history["loss"].append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if config.eval_every and result.steps % config.eval_every == 0:
                evaluate()
                model.train()
        if corr_n:
            logger.info(
                "%s: epoch %d mean batch reward-length correlation %.3f (length_penalty %g)",
                expert,
                epoch + 1,
                corr_sum / corr_n,
                config.length_penalty,
            )
            corr_sum = corr_n = 0.0
        if not config.eval_every:
            evaluate()
        if config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
            result.stopped_early = stop = True
            logger.info("%s: early stop after epoch %d", expert, epoch + 1)
        if ckpt is not None and accelerator.is_main_process:
            save_checkpoint(ckpt, params, optimizer, scheduler, epoch + 1, result, best_state, bad_evals)
    if best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state, strict=True):
                p.copy_(v)
    bank.requires_grad_(False)
    bank.eval()
    accelerator.free_memory()
    return result


def save_curves(history: dict, path: str | Path, title: str = "") -> None:
    """Training loss and dev agreement against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    if history.get("loss"):
        ax[0].plot(history["step"], history["loss"], lw=0.8)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("train loss")
    if history.get("dev_agreement"):
        ax[1].plot(history["dev_step"], history["dev_agreement"], marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("dev agreement")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_dict(config) -> dict:
    return asdict(config)
