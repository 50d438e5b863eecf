"""The router and the three phases of each category's inner model, one function each.

Each takes its data and returns what it trained; they change only the parameters their docstring names
(the tests check this): phase 1 and 2 an adapter and its head, phase 3 an aggregator, the router its head.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dmoerm.aggregator import AGGREGATORS, Aggregator
from dmoerm.encoding import EncodedInput, RankedItem, encode
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.model import DMoERM, capability_expert_name, rm_expert
from dmoerm.scoring import expert_states, flatten, in_order, prompt_features
from dmoerm.training.distributed import (
    computed_in_shares,
    rank_and_world,
    share,
    sum_gradients,
    sum_over_ranks,
    with_other_ranks,
)
from dmoerm.training.early_stopping import EarlyStopping
from dmoerm.training.gates import cross_fit_gate, cross_fit_pending, sign_test_gate, sign_test_p  # noqa: F401
from dmoerm.training.length import (
    check_length_weight,
    length_coefficient,
    length_correlation_penalty,
    length_feature,
    response_lengths,
)
from dmoerm.training.loop import (
    TrainConfig,
    TrainResult,
    pair_agreement,
    ranking_loss,
    score_items,
    train_expert,
)
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- router
@dataclass
class RouterTrainConfig:
    """Training of the router's classification head (the trunk is frozen, so features are computed once)."""

    learning_rate: float = 3e-3
    """AdamW learning rate."""
    epochs: int = 60
    """Full passes over the (small) feature matrix."""
    batch_size: int = 64
    """Prompts per step."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    balance_classes: bool = True
    """Weight the cross-entropy by inverse class frequency (Auto-J and RMB categories are imbalanced)."""
    seed: int = 0
    """Seed of the head's initial weights and of the batch order."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class RouterResult:
    """What :func:`train_router` returns; the run folder's state keeps ``dev_accuracy`` as ``accuracy``."""

    dev_accuracy: float
    """Share of the dev prompts routed to their own category (NaN without dev prompts)."""
    per_category: dict[str, dict] = field(default_factory=dict)
    """category -> {"n": dev prompts, "accuracy": share routed right}."""
    history: dict = field(default_factory=lambda: {"step": [], "loss": []})


def _seeded_router_init(router, seed: int) -> None:
    """Draw the router's head afresh under ``seed``, not from whatever the process's RNG gave when the model
    was built, so two runs of one config train the same router. A generator of its own leaves the global RNG
    (which later experts' initial weights draw from) as it was."""
    gen = torch.Generator().manual_seed(seed)
    head = router.head
    bound = 1.0 / math.sqrt(head.in_features)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with torch.no_grad():
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=gen) * 2 * bound - bound)
    router.norm.reset_parameters()


def _router_loss(router, x, y, idx, weight, rank: int, world: int) -> torch.Tensor:
    """Cross-entropy of the prompts ``idx``; under several processes this rank's share of it (a contiguous
    share of ``idx``, over the whole batch's total weight), so the ranks' gradients sum to the batch's."""
    if world == 1:
        return F.cross_entropy(router(x[idx]), y[idx], weight=weight)
    s = share(len(idx), rank, world)
    mine = idx[s.start : s.stop]
    total = weight[y[idx]].sum() if weight is not None else torch.tensor(float(len(idx)))
    return F.cross_entropy(router(x[mine]), y[mine], weight=weight, reduction="sum") / total


def train_router(
    model: DMoERM,
    train: Sequence[tuple[EncodedInput, str]],
    dev: Sequence[tuple[EncodedInput, str]],
    config: RouterTrainConfig,
    cache: TrunkCache,
    progress: bool = True,
) -> RouterResult:
    """Train ``model.router`` (only) with cross-entropy on logits over (prompt input, category) examples,
    from initial weights drawn under ``config.seed``."""
    index = {c: i for i, c in enumerate(model.categories)}
    train = [(e, c) for e, c in train if c in index]
    dev = [(e, c) for e, c in dev if c in index]
    if not train:
        raise ValueError("router: no training prompt has one of the model's categories")
    desc = "router trunk" if progress else None
    # Router.features, as DMoERM.route reads them when scoring; each rank computes its share.
    features = lambda inputs: prompt_features(model, inputs, cache, desc=desc)  # noqa: E731
    x = computed_in_shares(features, [e for e, _ in train], model.bank.device)  # [N, H]
    y = torch.tensor([index[c] for _, c in train])  # [N]
    counts = torch.bincount(y, minlength=len(index)).float()
    weight = (counts.sum() / (len(index) * counts.clamp(min=1))) if config.balance_classes else None
    _seeded_router_init(model.router, config.seed)
    torch.manual_seed(config.seed)
    model.requires_grad_(False)
    model.router.requires_grad_(True)
    model.router.train()
    opt = torch.optim.AdamW(
        model.router.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    result = RouterResult(dev_accuracy=float("nan"))
    step = 0
    rank, world = rank_and_world()
    for _ in range(config.epochs):
        perm = torch.randperm(len(y))  # the same on every rank (seeded above)
        for start in range(0, len(y), config.batch_size):
            idx = perm[start : start + config.batch_size]
            loss = _router_loss(model.router, x, y, idx, weight, rank, world)
            opt.zero_grad()
            loss.backward()
            sum_gradients(list(model.router.parameters()))
            opt.step()
            step += 1
            result.history["step"].append(step)
            result.history["loss"].append(sum_over_ranks(loss.detach()).item())
    model.router.requires_grad_(False)
    model.eval()
    if dev:
        score = lambda inputs: prompt_features(model, inputs, cache)  # noqa: E731
        xd = computed_in_shares(score, [e for e, _ in dev], model.bank.device)
        with torch.no_grad():
            pred = model.router(xd).argmax(-1)
        yd = torch.tensor([index[c] for _, c in dev])
        result.dev_accuracy = float((pred == yd).float().mean())
        for c, i in index.items():
            rows = yd == i
            if rows.any():
                result.per_category[c] = {
                    "n": int(rows.sum()),
                    "accuracy": float((pred[rows] == i).float().mean()),
                }
    logger.info("router: dev accuracy %.4f over %d prompts", result.dev_accuracy, len(dev))
    return result


# ---------------------------------------------------------------------------------------------- phase 1
WARM_START = "warmstart__rm"
"""Adapter of the pooled reward model that warm-started phase 1s start from (every category's phase-1 records)."""


def train_warm_start(
    model: DMoERM,
    train: Sequence[RankedItem],
    dev: Sequence[RankedItem],
    config: TrainConfig,
    cache: TrunkCache,
    checkpoint_dir=None,
    progress: bool = True,
) -> TrainResult:
    """The pooled reward model (adapter :data:`WARM_START` and its head) on every category's phase-1 rankings,
    the start of each category's phase 1 when warm-started (issue 13: 24 records a category start cold)."""
    if WARM_START not in model.bank.heads:
        model.bank.add_expert(WARM_START)
    desc = "warm start (all categories' phase 1)" if progress else None
    return train_expert(model.bank, WARM_START, train, dev, config, cache, checkpoint_dir, desc=desc)


def train_phase1(
    model: DMoERM,
    category: str,
    train: Sequence[RankedItem],
    dev: Sequence[RankedItem],
    config: TrainConfig,
    cache: TrunkCache,
    checkpoint_dir=None,
    progress: bool = True,
    init_from: str | None = None,
    gate_alpha: float = 1.0,
    gate_items: Sequence[RankedItem] | None = None,
    cross_fit: bool = False,
) -> TrainResult:
    """Phase 1: the category's reward model (adapter ``<category>__rm`` and its head) on human rankings.

    ``init_from`` (e.g. :data:`WARM_START`) copies that expert's adapter and head first; its weights are then
    measured on dev before the first step, so specialising is kept only when it beats the start on dev; with
    ``gate_alpha`` < 1 only when it also passes :func:`sign_test_gate` against the start on ``gate_items``
    (default: dev itself, which also picked the best epoch), else the expert goes back to exactly the start
    (``result.gate`` says which); with ``cross_fit`` the test is :func:`cross_fit_gate` over dev instead."""
    name = rm_expert(category)
    if name not in model.bank.heads:
        model.bank.add_expert(name, init_from=init_from)
    gated = init_from is not None and gate_alpha < 1.0
    patience = config.early_stopping_patience
    result = train_expert(
        model.bank,
        name,
        train,
        dev,
        config,
        cache,
        checkpoint_dir,
        desc=f"{category} phase 1" if progress else None,
        evaluate_first=init_from is not None,
        pending=(lambda evs: cross_fit_pending(dev, evs, patience)) if gated and cross_fit else None,
    )
    gate = dev if gate_items is None else gate_items
    if gated and cross_fit and result.dev_rewards:
        result.gate = cross_fit_gate(dev, result.dev_rewards, patience, gate_alpha)
        if not result.gate.get("kept", True):
            model.bank.copy_expert(init_from, name)
            result.best_dev_agreement = pair_agreement(dev, result.dev_rewards[0])
    elif gated and gate:
        specialised, start = (score_items(model.bank, n, gate, cache) for n in (name, init_from))
        result.gate = sign_test_gate(gate, specialised, start, gate_alpha)
        if not result.gate["kept"]:
            model.bank.copy_expert(init_from, name)
            if dev:  # the start's dev agreement; its rewards are at hand when the gate read dev itself
                at_start = start if gate is dev else score_items(model.bank, name, dev, cache)
                result.best_dev_agreement = pair_agreement(dev, at_start)
    return result


# ---------------------------------------------------------------------------------------------- phase 2
def labels_to_items(labels: Sequence[CapabilityLabel], tokenizer, max_length: int) -> list[RankedItem]:
    """Capability labels -> ranked items (ties dropped; the label's confidence weighs its loss)."""
    items = []
    for label in labels:
        if label.winner == "tie":
            continue
        inputs = (
            encode(tokenizer, label.conversation, label.response_a, max_length),
            encode(tokenizer, label.conversation, label.response_b, max_length),
        )
        pair = ((0, 1),) if label.winner == "a" else ((1, 0),)
        items.append(RankedItem(inputs, pair, max(float(label.confidence), 1e-3), label.category))
    return items


def train_phase2(
    model: DMoERM,
    category: str,
    capability: str,
    train: Sequence[RankedItem],
    dev: Sequence[RankedItem],
    config: TrainConfig,
    cache: TrunkCache,
    checkpoint_dir=None,
    progress: bool = True,
) -> TrainResult:
    """Phase 2: one capability expert, started from phase 1 (a copy of its adapter and head), on that
    capability's preference labels. Only the new adapter ``<category>__<capability>`` and its head train."""
    name = capability_expert_name(category, capability)
    if name not in model.bank.heads:
        if rm_expert(category) not in model.bank.heads:
            raise ValueError(f"{category}: phase 2 starts from phase 1; train phase 1 first")
        model.bank.add_expert(name, init_from=rm_expert(category))
    return train_expert(
        model.bank,
        name,
        train,
        dev,
        config,
        cache,
        checkpoint_dir,
        desc=f"{category}/{capability} phase 2" if progress else None,
    )


# ---------------------------------------------------------------------------------------------- phase 3
@dataclass
class AggregatorTrainConfig:
    """Training of a category's aggregator MLP over frozen expert states (computed once)."""

    learning_rate: float = 1e-3
    """AdamW learning rate."""
    epochs: int = 30
    """Passes over the training items (early stopping on dev agreement may end sooner)."""
    batch_size: int = 16
    """Items per step."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    early_stopping_patience: int = 5
    """Epochs without dev improvement before stopping (0 disables); the best weights are kept."""
    seed: int = 0
    aggregator: str = "mlp"
    """``mlp``: the paper's MLP over the experts' states is the reward. ``residual``: the category's phase-1
    reward plus an MLP correction that starts at zero; dev agreement is measured before the first step too,
    so the correction is kept only when it beats "no correction" on dev. ``linear``: one weight per expert
    over their scalar scores, starting at the phase-1 reward, kept the same way (see
    :data:`dmoerm.aggregator.AGGREGATORS`)."""
    length_penalty: float = 0.0
    """Weight of the length decorrelation penalty on the aggregator's reward, as ``TrainConfig.length_penalty``
    (squared correlation of reward with response tokens over each batch's responses, added to the ranking
    loss; see :func:`dmoerm.training.length.length_correlation`). 0 (the default) leaves the loss unchanged."""
    length_covariate: float = 0.0
    """The length-only model in the loss, as ``TrainConfig.length_covariate``: the aggregator's reward plus
    this times ``beta * log(response tokens)``, ``beta`` fitted on phase 3's training pairs, is what the loss
    ranks; dev and every score read the reward alone. 0 (the default) leaves the loss unchanged."""
    gate_alpha: float = 1.0
    """How sure dev must be before a ``residual`` or ``linear`` aggregator keeps its correction: the best
    epoch's rewards are kept only when, over the dev pairs it ranks differently from "no correction", the
    pairs it turns right outnumber those it turns wrong at this level of a one-sided sign test
    (:func:`sign_test_p`); otherwise the aggregator goes back to its start. 1.0 keeps the best epoch whenever
    its dev agreement is higher (the rule before this field). On 16 dev records the best of 30 epochs beats
    the start by chance (docs/levers.md), which 0.05 stops."""

    def __post_init__(self) -> None:
        check_length_weight(self.length_penalty, "length_penalty")
        check_length_weight(self.length_covariate, "length_covariate")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator: {self.aggregator!r} is not one of {', '.join(AGGREGATORS)}")
        if isinstance(self.gate_alpha, bool) or not 0.0 < self.gate_alpha <= 1.0:
            raise ValueError(f"gate_alpha: must be in (0, 1], got {self.gate_alpha!r}")
        if self.gate_alpha < 1.0 and self.aggregator == "mlp":
            raise ValueError(
                "gate_alpha: the gate compares a correction with its start; the mlp aggregator has none "
                "(use residual or linear)"
            )


def _aggregator_inputs(model: DMoERM, names: list[str], items: Sequence[RankedItem], cache: TrunkCache):
    """Frozen experts' states [K, N, H] and scalar scores [K, N] of every response, and each item's rows."""
    flat, slices = flatten(items)
    where = [list(range(rows.start, rows.stop)) for rows in slices]
    if not flat:
        return None, None, where, flat
    model.eval()
    # Consecutive batches of 16, as phase 3 has always read its states (the same features, bit for bit).
    states = lambda inputs: expert_states(  # noqa: E731
        model.bank, names, inputs, cache, batches=in_order(len(inputs), 16)
    )
    feats = computed_in_shares(states, flat, model.bank.device, dim=1)  # [K, N, H], each rank its share
    with torch.no_grad():
        scores = torch.stack(
            [model.bank.heads[n](feats[i].to(model.bank.device)).squeeze(-1) for i, n in enumerate(names)]
        )
    return feats, scores.cpu(), where, flat


def train_phase3(
    model: DMoERM,
    category: str,
    train: Sequence[RankedItem],
    dev: Sequence[RankedItem],
    config: AggregatorTrainConfig,
    cache: TrunkCache,
    experts: list[str] | None = None,
    gate_items: Sequence[RankedItem] | None = None,
    cross_fit: bool = False,
) -> TrainResult:
    """Phase 3: backbone and experts frozen; the category's aggregator MLP over the concatenated last-token
    states of its experts (default: its capability experts), trained on human rankings not used before.

    ``config.aggregator == "residual"`` puts the phase-1 model first among the experts and adds its reward to
    the MLP's zero-initialised output; "no correction" is then the first dev measurement to beat.
    With ``config.length_penalty`` > 0 the squared correlation of each batch's rewards with response length,
    times that weight, is added to the ranking loss (experts keep whatever length signal they learned; the
    aggregator is pushed not to pass it on). ``config.gate_alpha`` < 1 tests the kept correction against "no
    correction" on ``gate_items`` (default: dev, which also picked the best epoch); with ``cross_fit`` by
    :func:`cross_fit_gate` over dev instead."""
    names = experts or model.category_experts(category)
    residual = config.aggregator != "mlp"
    if residual:
        names = [rm_expert(category)] + [n for n in names if n != rm_expert(category)]
    if not names:
        raise ValueError(f"{category}: no experts to aggregate; run phase 2 first (or pass experts=)")
    model.requires_grad_(False)
    feats, scores, where, flat = _aggregator_inputs(model, names, train, cache)  # computed once: frozen
    dev_data = _aggregator_inputs(model, names, dev, cache)
    lengths = response_lengths(flat)  # [N] response tokens, for the length penalty
    coefficient = length_coefficient(train, config.length_covariate)
    # [N] the length-only model's share of each response's reward in the loss (None: no covariate)
    offsets = None if coefficient is None else coefficient * length_feature(lengths)
    torch.manual_seed(config.seed)
    agg = Aggregator(len(names), model.bank.hidden_size, kind=config.aggregator)
    opt = torch.optim.AdamW(agg.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    result = TrainResult(length_coefficient=coefficient)
    crossed = cross_fit and residual and config.gate_alpha < 1.0
    tracker = _BestOnDev(agg, dev, dev_data, config.early_stopping_patience, cross_fit=crossed)
    if residual:
        tracker.evaluate(result)  # step 0: the phase-1 reward alone, the bar the correction must clear
        tracker.keep_start()
    rng = random.Random(config.seed)
    order = list(range(len(train)))
    rank, world = rank_and_world()
    data = (feats, scores, where, lengths, offsets)
    for _epoch in range(config.epochs):
        rng.shuffle(order)
        _aggregator_epoch(agg, opt, data, train, order, config, result, rank, world)
        if tracker.evaluate(result):
            result.stopped_early = True
            break
    tracker.restore()
    if residual and config.gate_alpha < 1.0:
        held = (
            None if gate_items is None else (gate_items, _aggregator_inputs(model, names, gate_items, cache))
        )
        result.gate = tracker.gate(config.gate_alpha, result, held)
    agg.requires_grad_(False)
    agg.eval()
    model.aggregators[category] = agg
    model.aggregator_experts[category] = list(names)
    logger.info(
        "%s phase 3: dev agreement %.4f (%d experts, %s)",
        category,
        result.best_dev_agreement,
        len(names),
        config.aggregator,
    )
    return result


def _aggregator_epoch(
    agg, opt, data, train, order, config, result: TrainResult, rank: int, world: int
) -> None:
    """One epoch of phase 3's updates, batches of ``config.batch_size`` items in ``order``, each logged in
    ``result`` (``data``: :func:`_aggregator_loss`'s)."""
    agg.train()
    for start in range(0, len(order), config.batch_size):
        chunk = order[start : start + config.batch_size]
        if not any(train[i].pairs for i in chunk):
            continue
        loss, logged = _aggregator_loss(agg, data, train, chunk, config.length_penalty, rank, world)
        opt.zero_grad()
        loss.backward()
        sum_gradients(list(agg.parameters()))
        opt.step()
        result.steps += 1
        result.history["step"].append(result.steps)
        result.history["loss"].append(logged)


def _aggregator_loss(agg, data, train, chunk, length_penalty: float, rank: int, world: int):
    """(loss, logged batch loss) of the items ``chunk``: under several processes this rank's share of the
    batch's loss (pair weights over the whole batch's total), so the ranks' gradients sum to the batch's."""
    feats, scores, where, lengths, offsets = data
    wts_all = [train[i].weight / len(train[i].pairs) for i in chunk for _ in train[i].pairs]
    total = torch.tensor(wts_all).sum().clamp(min=1e-8)
    s = share(len(chunk), rank, world)
    mine = chunk[s.start : s.stop]
    rows = [r for i in mine for r in where[i]]
    local = {r: j for j, r in enumerate(rows)}
    pairs = [(local[where[i][b]], local[where[i][w]]) for i in mine for b, w in train[i].pairs]
    wts = [train[i].weight / len(train[i].pairs) for i in mine for _ in train[i].pairs]
    rewards = agg(feats[:, rows], scores[:, rows])  # [n]
    ranked = rewards if offsets is None else rewards + offsets[rows]  # the length-only model: the loss alone
    loss = ranking_loss(ranked, torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(wts), total)
    logged = sum_over_ranks(loss.detach())
    if length_penalty > 0:
        counts = [
            sum(len(where[i]) for i in chunk[p.start : p.stop])
            for p in (share(len(chunk), r, world) for r in range(world))
        ]
        all_rows = [r for i in chunk for r in where[i]]
        full = with_other_ranks(rewards, counts)  # [N] the whole batch's rewards
        penalty = length_penalty * length_correlation_penalty(full, lengths[all_rows])
        loss, logged = loss + penalty, logged + penalty.detach()
    return loss, logged.item()


class _BestOnDev:
    """Dev agreement after each epoch; keeps the best weights and says when patience ran out."""

    def __init__(self, agg: Aggregator, dev: Sequence[RankedItem], dev_data, patience: int, cross_fit=False):
        self.agg, self.dev, self.patience = agg, dev, patience
        self.feats, self.scores, self.where, _ = dev_data
        self.stopping = EarlyStopping(patience)
        self.start = None
        self.cross_fit = cross_fit
        self.evaluations: list[list[list[float]]] = []
        """With ``cross_fit``: each evaluation's rewards per dev item, the start's first."""

    def _dev_rewards(self, data=None) -> list[list[float]]:
        """Rewards per item of ``data`` (``_aggregator_inputs``' output; default: dev's)."""
        feats, scores, where = (self.feats, self.scores, self.where) if data is None else data[:3]
        if feats is None:
            return [[] for _ in where]
        self.agg.eval()
        with torch.no_grad():
            r = self.agg(feats, scores).tolist()
        return [[r[j] for j in w] for w in where]

    def evaluate(self, result: TrainResult) -> bool:
        """Record dev agreement; True when training should stop (with ``cross_fit``, once each half of dev
        has run out of patience too: until then early stopping's pick is fixed and training goes on)."""
        if self.feats is None:
            return False
        rewards = self._dev_rewards()
        agreement = pair_agreement(self.dev, rewards)
        result.history["dev_step"].append(result.steps)
        result.history["dev_agreement"].append(agreement)
        if not self.stopping.should_stop:
            self.stopping.record(agreement, lambda: {k: v.clone() for k, v in self.agg.state_dict().items()})
            result.best_dev_agreement = self.stopping.best_agreement
        if self.cross_fit:
            self.evaluations.append(rewards)
            return self.stopping.should_stop and not cross_fit_pending(
                self.dev, self.evaluations, self.patience
            )
        return self.stopping.should_stop

    def keep_start(self) -> None:
        """Remember the untrained aggregator ("no correction") for :meth:`gate`."""
        self.start = {k: v.clone() for k, v in self.agg.state_dict().items()}

    def restore(self) -> None:
        if self.stopping.best is not None:
            self.agg.load_state_dict(self.stopping.best)

    def gate(self, alpha: float, result: TrainResult, held=None) -> dict:
        """After :meth:`restore`: keep the restored correction only when the pairs it turns right beat those it
        turns wrong (against the start) by a one-sided sign test at ``alpha``; else load the start. The test
        reads dev, or ``held`` (items, their ``_aggregator_inputs``) when given: records that did not pick
        the best epoch."""
        items, data = (self.dev, None) if held is None else held
        if self.start is None or (self.feats if held is None else data[0]) is None:
            return {}
        if self.cross_fit:
            return self._cross_fit_gate(alpha, result)
        best = self._dev_rewards(data)
        kept = {k: v.clone() for k, v in self.agg.state_dict().items()}
        self.agg.load_state_dict(self.start)
        start = self._dev_rewards(data)
        gate = sign_test_gate(items, best, start, alpha)
        if gate["kept"]:
            self.agg.load_state_dict(kept)
        elif self.feats is not None:  # the start's dev agreement (its rewards at hand when the test read dev)
            result.best_dev_agreement = pair_agreement(
                self.dev, start if held is None else self._dev_rewards()
            )
        return gate

    def _cross_fit_gate(self, alpha: float, result: TrainResult) -> dict:
        """:func:`cross_fit_gate` over dev's evaluations (the start's first); the start loaded unless kept."""
        gate = cross_fit_gate(self.dev, self.evaluations, self.patience, alpha)
        if gate and not gate["kept"]:
            self.agg.load_state_dict(self.start)
            result.best_dev_agreement = pair_agreement(self.dev, self.evaluations[0])
        return gate
