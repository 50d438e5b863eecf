"""The shared machinery of every phase: the pairwise ranking loop.

Only the top layers (with one expert's LoRA adapter) and its value head train, so the frozen trunk's states
are computed once per input and reused across phases, experts and epochs (the performance issue; see
:mod:`dmoerm.training.trunk_cache`); scoring goes through :mod:`dmoerm.scoring`.
Training runs through Hugging Face ``accelerate``: the same code runs on several processes (DDP, DeepSpeed
ZeRO-2, or FSDP2 sharding the trained weights of a training view while the bank stays whole:
:mod:`dmoerm.training.sharding`).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmoerm.encoding import RankedItem, length_buckets
from dmoerm.scoring import expert_rewards, flatten, items_in_order, padded_states
from dmoerm.training.checkpoint import Checkpoint, ResumeState
from dmoerm.training.distributed import (
    gather_lists,
    process_accelerator,
    share,
    sum_over_ranks,
    with_other_ranks,
)
from dmoerm.training.early_stopping import EarlyStopping
from dmoerm.training.length import (
    check_length_weight,
    length_coefficient,
    length_correlation_penalty,
    length_feature,
    response_lengths,
)
from dmoerm.training.sharding import (
    ShardedExpert,
    check_sharding,
    deepspeed_settings,
    is_deepspeed,
    is_fsdp,
    zero_expert,
)
from dmoerm.training.trunk_cache import TrunkCache

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
    length_covariate: float = 0.0
    """Train as product-of-experts debiasing does (:mod:`dmoerm.training.length`): the loss ranks
    ``reward + length_covariate * beta * log(response tokens)``, with ``beta`` the length-only model fitted once
    on the training pairs (the added coefficient is ``TrainResult.length_coefficient``), while dev, the saved
    model and every score use the reward alone. The pairs length explains then teach little and those the
    shorter answer wins teach most; above 1 the length-only model is trusted more than its fit. 0 (the
    default): the ranking loss as before."""

    def __post_init__(self) -> None:
        check_length_weight(self.length_penalty, "length_penalty")
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
        check_length_weight(self.length_covariate, "length_covariate")


def ranking_loss(
    rewards: torch.Tensor,
    pairs: torch.Tensor,
    weights: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of -log sigmoid(r_better - r_worse) over pairs (the paper's loss over every untied pair).

    rewards: [N]; pairs: [P, 2] (better index, worse index) into rewards; weights: [P] or None -> scalar.
    ``total_weight`` (default ``weights.sum()``) is the denominator: a data-parallel rank passes its global
    batch's total, so the ranks' losses add up to the batch's.
    """
    pairs = pairs.to(rewards.device)
    margin = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]  # [P]
    loss = -F.logsigmoid(margin)
    if weights is None:
        return loss.mean()
    weights = weights.to(rewards.device)
    if total_weight is None:
        total_weight = weights.sum().clamp(min=1e-8)
    return (loss * weights).sum() / total_weight.to(rewards.device)


def pair_weights(items: Sequence[RankedItem]) -> list[float]:
    """Each untied pair's weight in the ranking loss, in item order: every item weighs the same (its
    ``weight``), however many pairs it has."""
    return [item.weight / len(item.pairs) for item in items for _ in item.pairs]


def batch_items(bank, items: Sequence[RankedItem], cache: TrunkCache) -> dict[str, torch.Tensor]:
    """Flatten a batch of ranked items: trunk states [N, T, H], mask [N, T], pairs [P, 2], weights [P],
    response lengths in tokens [N] and the item each response belongs to [N]."""
    flat, where = flatten(items)
    pairs = [(rows.start + b, rows.start + w) for item, rows in zip(items, where) for b, w in item.pairs]
    weights = pair_weights(items)
    groups = [k for k, item in enumerate(items) for _ in item.inputs]
    states, mask, _, _ = padded_states(bank, flat, cache)
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
    dev_rewards: list = field(default_factory=list)
    """Each dev evaluation's rewards per dev item (the start's first with ``evaluate_first``), kept only when
    a cross-fitted gate reads them (``train_expert(pending=...)``)."""
    gate: dict = field(default_factory=dict)
    """Phase 1 (``specialise.gate_alpha``) or phase 3 (``gate_alpha``) with a gate below 1: the dev pairs the
    change turned right and wrong against its start, the sign test's p and whether it was kept (else empty)."""
    length_coefficient: float | None = None
    """With ``length_covariate``: the coefficient on log tokens the loss added (``length_covariate * beta``),
    else None."""


def _autocast(accelerator, mixed_precision: str):
    """bf16 autocast of the top layers when ``mixed_precision`` is ``bf16``; a no-op context otherwise."""
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def full_weights(
    accelerator, model, names: Sequence[str], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Copies of the weights ``names`` of a prepared ``model`` (``accelerator.get_state_dict``; every rank must
    call this, and where only rank 0 receives the gathered dict the others copy their ``params``). Under DDP,
    ZeRO-2 or one process: the model's own weights (FSDP2 gathers its own: :class:`ShardedExpert`)."""
    state = accelerator.get_state_dict(model)
    return [(state[n] if n in state else p).detach().clone() for n, p in zip(names, params, strict=True)]


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches of item indices: length buckets in an order shuffled under ``seed + epoch``,
    the same on every rank (each then takes its :func:`~dmoerm.training.distributed.share` of each batch)."""
    batches = length_buckets(lengths, batch_size)
    random.Random(seed + epoch).shuffle(batches)
    return batches


def _expert_optimizer(params, config: TrainConfig, n_train: int):
    """AdamW over ``params`` and its schedule: linear warm-up, then linear decay to 0 at the last update."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(n_train / config.batch_size)
    updates = max(1, math.ceil(batches_per_epoch * config.epochs / config.gradient_accumulation_steps))
    warmup = int(config.warmup_ratio * updates)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (updates - step) / max(1, updates - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class _ExpertRun:
    """One expert's training under the process's accelerator: the step, dev evaluation and checkpoints.

    Every rank builds the same global batches; each takes a contiguous share of a batch's items, and its loss
    is its share of the batch's loss (pair weights over the whole batch's total) times the world size, because
    DDP (and FSDP2's reduce-scatter) averages the ranks' gradients: the update equals the one-process
    full-batch update. ``params`` are the bank's own trainable weights; ``trained`` the ones the optimizer
    steps: the same under DDP, the training view's shards under FSDP2 (``sharded``), which are copied into
    the bank whole for dev scoring and at the end. Under DeepSpeed ``sharded`` is a ZeRO-1/2
    :class:`~dmoerm.training.sharding.ZeroExpert` (the bank's own parameters train, whole on every rank) or a
    ZeRO-3 :class:`~dmoerm.training.sharding.ZeroThreeExpert` (partitioned copies, gathered like FSDP2's);
    DeepSpeed steps and clips inside ``accelerator.backward`` by the run's filled DeepSpeed config."""

    def __init__(self, bank, expert: str, train, dev, config: TrainConfig, cache: TrunkCache, desc):
        self.bank, self.expert, self.dev, self.config, self.cache = bank, expert, dev, config, cache
        self.accelerator = acc = process_accelerator()
        check_sharding(acc)  # an unsupported DeepSpeed or FSDP setting stops before the bank is touched
        zero = deepspeed_settings(acc, config) if is_deepspeed(acc) else None  # so does a contradicting JSON
        acc.gradient_accumulation_steps = config.gradient_accumulation_steps
        acc.step = (
            0  # accumulation counts from this run's first step, not from an earlier run's (resume sets it)
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        torch.manual_seed(config.seed)
        bank.requires_grad_(False)
        self.params = bank.expert_parameters(expert)
        for p in self.params:
            p.requires_grad_(True)
        names = {id(p): n for n, p in bank.named_parameters()}
        self.names = [names[id(p)] for p in self.params]
        self.lengths = [sum(len(e.input_ids) for e in item.inputs) for item in train]
        # Trunk states of this rank's items, once, before a sharding wrapper may split the trunk (its share of
        # each length bucket: shuffling the buckets' order never changes which rank holds an item); epochs
        # and dev evaluations reuse them.
        mine = sorted(
            i for b in length_buckets(self.lengths, config.batch_size) for i in b[self._slice(len(b))]
        )
        own_dev = list(dev)[self._slice(len(dev))]
        inputs = [e for item in [train[i] for i in mine] + own_dev for e in item.inputs]
        cache.get(bank, inputs, desc=desc and f"{desc} trunk")
        optimizer, self.scheduler = _expert_optimizer(self.params, config, len(train))
        self.length_coefficient = length_coefficient(train, config.length_covariate)
        # The scheduler stays unprepared: accelerate would step it once per process and update.
        self.sharded = ShardedExpert(acc, bank, self.params, self.names, optimizer) if is_fsdp(acc) else None
        if zero is not None:  # ZeRO-1/2 partition gradients and AdamW state; ZeRO-3 the trained weights too
            self.sharded = zero_expert(acc, bank, self.params, self.names, optimizer, zero)
        if self.sharded is not None:
            self.model, self.optimizer = self.sharded.model, self.sharded.optimizer
            self.trained = self.sharded.params
        else:
            self.model, self.optimizer = acc.prepare(bank, optimizer)
            self.trained = self.params

    def _slice(self, n: int) -> slice:
        s = share(n, self.rank, self.world)
        return slice(s.start, s.stop)

    def weights(self) -> list[torch.Tensor]:
        """Copies of the trained weights, whole on every rank (every rank calls this at once)."""
        if self.sharded is not None:
            return self.sharded.weights()
        return full_weights(self.accelerator, self.model, self.names, self.params)

    def finish(self, best: list[torch.Tensor] | None) -> None:
        """Leave the bank's own weights at ``best`` (else at the trained ones), whole on every rank."""
        if self.sharded is not None:
            self.sharded.to_bank()
            self.sharded.release()
        if best is not None:
            with torch.no_grad():
                for p, v in zip(self.params, best, strict=True):
                    p.copy_(v)

    def _rewards(self, items: Sequence[RankedItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rewards [n] of its share and its ranking-loss share over the batch's total weight."""
        total = torch.tensor(pair_weights(items), dtype=torch.float32).sum().clamp(min=1e-8)
        mine = list(items)[self._slice(len(items))]
        if mine:
            batch = batch_items(self.bank, mine, self.cache)
            with _autocast(self.accelerator, self.config.mixed_precision):
                rewards = self.model(batch["states"], batch["attention_mask"], self.expert)  # [n]
            ranked = rewards.float()
            if self.length_coefficient is not None:  # the length-only model's share, in the loss alone
                ranked = ranked + self.length_coefficient * length_feature(batch["lengths"]).to(ranked.device)
            return rewards, ranking_loss(ranked, batch["pairs"], batch["weights"], total)
        # No item here: a zero-weighted forward of one blank state still joins DDP's gradient all-reduce.
        blank = torch.zeros(1, 1, self.bank.hidden_size, dtype=self.bank.backbone.trunk_dtype)
        with _autocast(self.accelerator, self.config.mixed_precision):
            rewards = self.model(blank.to(self.bank.device), torch.ones(1, 1, dtype=torch.long), self.expert)
        return rewards[:0], rewards.float().sum() * 0.0

    def step(self, items: Sequence[RankedItem]) -> tuple[float, float]:
        """One global batch: forward and backward of this rank's share (under gradient accumulation); the
        batch's loss and length penalty, the same on every rank."""
        acc, config = self.accelerator, self.config
        with acc.accumulate(self.model):
            rewards, loss = self._rewards(items)
            logged, penalty = sum_over_ranks(loss.detach()), torch.zeros(())
            if config.length_penalty > 0:
                counts = [
                    sum(len(items[i].inputs) for i in share(len(items), r, self.world))
                    for r in range(self.world)
                ]
                flat, where = flatten(items)
                groups = torch.tensor(
                    [k for k, rows in enumerate(where) for _ in range(rows.start, rows.stop)]
                )
                full = with_other_ranks(rewards, counts)  # [N] the whole batch's rewards
                penalty = length_correlation_penalty(full, response_lengths(flat), groups)
                loss = loss + config.length_penalty * penalty
                logged = logged + (config.length_penalty * penalty).detach()
            acc.backward(loss * self.world)
            if acc.sync_gradients and config.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trained, config.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return logged.item(), float(penalty.detach())

    def dev_rewards(self) -> list[list[float]]:
        """Rewards per dev item: each rank scores its share, the rewards are gathered, every rank has them."""
        if self.sharded is not None:
            self.sharded.to_bank()  # each rank then scores its own share on the whole bank, no collective
        own = list(self.dev)[self._slice(len(self.dev))]
        return gather_lists(score_items(self.bank, self.expert, own, self.cache))

    def resume(self, checkpoint: Checkpoint | None) -> tuple[int, TrainResult, EarlyStopping]:
        """(first epoch, result so far, early stopping so far): from ``checkpoint`` when it exists."""
        patience = self.config.early_stopping_patience
        if checkpoint is not None and (checkpoint.path.parent / "checkpoint.pt").exists():
            logger.warning(
                "%s: ignoring checkpoint.pt of an older version (pickles are never loaded)",
                checkpoint.path.parent,
            )
        if checkpoint is None or not checkpoint.exists():
            return 0, TrainResult(), EarlyStopping(patience)
        optimizer = self.optimizer if self.sharded is None else self.sharded.whole_optimizer()
        state = checkpoint.load(self.params, optimizer, self.scheduler)
        if self.sharded is not None:
            self.sharded.from_bank()
        result = TrainResult(**state.result)
        self.accelerator.step = result.steps  # where gradient accumulation stood
        logger.info("%s: resumed from %s at epoch %d", self.expert, checkpoint.path, state.epoch)
        return (
            state.epoch,
            result,
            EarlyStopping(patience, result.best_dev_agreement, state.best, state.bad_evals),
        )

    def save(self, checkpoint: Checkpoint, epoch: int, result: TrainResult, stopping: EarlyStopping) -> None:
        """Rank 0 writes the checkpoint (weights gathered whole on every rank first); all ranks wait for it."""
        weights = self.weights()
        optimizer = self.optimizer if self.sharded is None else self.sharded.whole_optimizer().gather()
        if self.accelerator.is_main_process:
            state = ResumeState(epoch, asdict(result), stopping.best, stopping.bad)
            checkpoint.save(weights, optimizer, self.scheduler, state)
        self.accelerator.wait_for_everyone()


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
    pending: Callable[[list], bool] | None = None,
) -> TrainResult:
    """Train expert ``expert`` (its adapter or the top layers, and its value head) with the ranking loss.

    With ``config.length_penalty`` > 0 the loss adds that weight times the squared correlation of the batch's
    rewards with response length (the logged loss is the sum).

    Exactly ``bank.expert_parameters(expert)`` change; everything else stays frozen. With ``checkpoint_dir``,
    the trainable weights, optimizer, scheduler and position are saved after each epoch, and a rerun resumes
    from there. The weights with the best dev agreement are restored at the end. Under several processes
    (``accelerate launch``) the result equals one process's with the same global batch (:class:`_ExpertRun`);
    under FSDP2 too, and the bank handed back is unsharded (:mod:`dmoerm.training.sharding`).

    With ``pending`` every evaluation's dev rewards are kept in ``result.dev_rewards``, and once early
    stopping's patience has run out training goes on (early stopping's pick then fixed) while
    ``pending(result.dev_rewards)`` is true: a cross-fitted gate's halves each need their own stopping point
    (:func:`dmoerm.training.gates.cross_fit_pending`).
    """
    if not train:
        raise ValueError(f"{expert}: no training items")
    run = _ExpertRun(bank, expert, train, dev, config, cache, desc)
    checkpoint = Checkpoint(checkpoint_dir) if checkpoint_dir else None
    start_epoch, result, stopping = run.resume(checkpoint)
    if run.length_coefficient is not None:
        result.length_coefficient = run.length_coefficient
        logger.info("%s: length-only model's coefficient %.4f on log tokens", expert, run.length_coefficient)

    def evaluate(picking: bool = True) -> None:
        if dev:
            rewards = run.dev_rewards()
            agreement = pair_agreement(dev, rewards)
            result.history["dev_step"].append(result.steps)
            result.history["dev_agreement"].append(agreement)
            logger.info("%s: step %d dev agreement %.4f", expert, result.steps, agreement)
            if pending is not None:
                result.dev_rewards.append(rewards)
            if picking:
                stopping.record(agreement, run.weights)
                result.best_dev_agreement = stopping.best_agreement

    if evaluate_first and not result.history["dev_step"]:
        evaluate()  # the starting weights (a warm start) are the first candidate for "best on dev"
    for epoch in range(start_epoch, config.epochs):
        if result.stopped_early:
            break
        picking = not stopping.should_stop  # else this epoch runs only for ``pending``'s sake
        _train_epoch(run, train, epoch, result, desc, functools.partial(evaluate, picking))
        if not config.eval_every:
            evaluate(picking)
        if stopping.should_stop and not (pending is not None and pending(result.dev_rewards)):
            result.stopped_early = True
            logger.info("%s: early stop after epoch %d", expert, epoch + 1)
        if checkpoint is not None:
            run.save(checkpoint, epoch + 1, result, stopping)
    run.finish(stopping.best)
    bank.requires_grad_(False)
    bank.eval()
    run.accelerator.free_memory()
    return result


def _train_epoch(run: _ExpertRun, train, epoch: int, result: TrainResult, desc, evaluate) -> None:
    """One epoch's updates of ``run``, each logged in ``result``; with ``eval_every``, ``evaluate()`` every
    that many updates."""
    config = run.config
    run.model.train()
    penalties = []
    batches = epoch_batches(run.lengths, config.batch_size, config.seed, epoch)
    for idx in tqdm(
        batches, desc=f"{desc or run.expert} epoch {epoch + 1}/{config.epochs}", disable=desc is None
    ):
        items = [train[i] for i in idx]
        if not any(item.pairs for item in items):
            continue
        loss, penalty = run.step(items)
        penalties.append(penalty)
        result.steps += 1
        result.history["step"].append(result.steps)
        result.history["loss"].append(loss)
        if config.eval_every and result.steps % config.eval_every == 0:
            evaluate()
            run.model.train()
    if config.length_penalty > 0 and penalties:
        logger.info(
            "%s: epoch %d mean batch squared reward-length correlation %.4f (length_penalty %g)",
            run.expert, epoch + 1, sum(penalties) / len(penalties), config.length_penalty,
        )  # fmt: skip


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
