"""The one scoring path: encoded inputs -> trunk batches -> rewards, DMoERM outputs, expert states, router features.

Training (dev agreement, phase 3's frozen expert states, the router's features), evaluation (the pipeline's
``score_cached``) and serving (``RewardModel.rewards``, ``DMoERM.score_inputs``) all score through
:func:`trunk_batches`: each batch's trunk states [B, T, H] come from a
:class:`~dmoerm.training.trunk_cache.TrunkCache` when one is given, else from ``bank.trunk``, with the
attention and prompt masks of :func:`~dmoerm.encoding.collate`. The trunk runs each row alone, so a state
does not depend on its batch; the float32 top layers run on the padded batch, so a reward depends on the
batch's shape by float32 rounding only. Batches are length-bucketed unless the caller passes its own
(:func:`in_order`, :func:`items_in_order`: the batchings evaluation and phase 3 have always used, kept so
their numbers stay bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dmoerm.encoding import EncodedInput, RankedItem, collate, length_buckets
from dmoerm.outputs import RewardOutput
from dmoerm.training.trunk_cache import pad_states


def flatten(items: Sequence[RankedItem]) -> tuple[list[EncodedInput], list[slice]]:
    """Every response of every item, in order, and each item's rows in that list."""
    flat: list[EncodedInput] = []
    where: list[slice] = []
    for item in items:
        where.append(slice(len(flat), len(flat) + len(item.inputs)))
        flat.extend(item.inputs)
    return flat, where


def in_order(n: int, batch_size: int) -> list[list[int]]:
    """Batches of ``batch_size`` consecutive inputs, in their order."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def items_in_order(where: Sequence[slice], batch_size: int) -> list[list[int]]:
    """Batches holding the responses of ``batch_size`` consecutive items (``where`` from :func:`flatten`)."""
    return [
        list(range(where[start].start, where[min(start + batch_size, len(where)) - 1].stop))
        for start in range(0, len(where), batch_size)
    ]


@dataclass
class TrunkBatch:
    """One batch of trunk states, right-padded."""

    index: list[int]
    """Position of each row in the scored inputs."""
    states: torch.Tensor
    """[B, T, H] trunk states (zeros at pads)."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens."""
    prompt_mask: torch.Tensor
    """[B, T] 1 on prompt tokens (what the router reads)."""
    input_ids: torch.Tensor
    """[B, T] the rows' tokens, right-padded (what the backbone's likelihood of a response reads)."""


def padded_states(
    bank, inputs: Sequence[EncodedInput], cache=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trunk states [B, T, H], attention mask [B, T], prompt mask [B, T] and token ids [B, T] of one batch of
    inputs, right-padded: the states from ``cache`` (a :class:`~dmoerm.training.trunk_cache.TrunkCache`) when
    given, else ``bank.trunk``."""
    batch = collate(inputs, bank.tokenizer.pad_token_id)
    if cache is None:
        states = bank.trunk(batch["input_ids"], batch["attention_mask"])  # [B, T, H], each row alone
    else:
        states, _ = pad_states(cache.get(bank, inputs))  # [B, T, H], the same mask as collate's
    return states, batch["attention_mask"], batch["prompt_mask"], batch["input_ids"]


def trunk_batches(
    bank,
    inputs: Sequence[EncodedInput],
    cache=None,
    batch_size: int = 16,
    batches: Sequence[Sequence[int]] | None = None,
    desc: str | None = None,
) -> Iterator[TrunkBatch]:
    """Trunk batches over ``inputs``: length-bucketed batches of ``batch_size``, or ``batches`` (index lists).

    With a cache and ``desc``, every missing state is computed first under a progress bar of that name (the
    trunk runs each row alone, so a state is the same whichever batch computes it)."""
    if cache is not None and desc is not None:
        cache.get(bank, inputs, batch_size, desc=desc)
    if batches is None:
        batches = length_buckets([len(e.input_ids) for e in inputs], batch_size)
    for idx in batches:
        if len(idx):
            yield TrunkBatch(list(idx), *padded_states(bank, [inputs[i] for i in idx], cache))


@contextmanager
def _inference(module: nn.Module):
    """No gradients and eval mode (no LoRA dropout; PEFT's mixed-adapter batches), restored afterwards."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()


def expert_rewards(
    bank,
    expert: str,
    inputs: Sequence[EncodedInput],
    cache=None,
    batch_size: int = 16,
    batches: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Expert ``expert``'s reward of each input, in their order: [N] float32 on the CPU."""
    out = torch.empty(len(inputs))
    with _inference(bank):
        for b in trunk_batches(bank, inputs, cache, batch_size, batches):
            out[b.index] = bank(b.states, b.attention_mask, expert).float().cpu()  # [B]
    return out


def response_likelihoods(
    bank, inputs: Sequence[EncodedInput], cache=None, batch_size: int = 16
) -> torch.Tensor:
    """The backbone's mean log-probability of each input's response
    (:func:`~dmoerm.likelihood.response_log_likelihood`), in their order: [N] float32 on the CPU."""
    from dmoerm.likelihood import response_log_likelihood

    out = torch.empty(len(inputs))
    with _inference(bank):
        for b in trunk_batches(bank, inputs, cache, batch_size):
            out[b.index] = response_log_likelihood(
                bank, b.states, b.attention_mask, b.prompt_mask, b.input_ids
            ).cpu()  # [B]
    return out


def expert_states(
    bank,
    names: list[str],
    inputs: Sequence[EncodedInput],
    cache=None,
    batch_size: int = 16,
    batches: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Frozen experts' last-token states of each input, every expert in one batched pass: [K, N, H]
    (on the bank's device)."""
    out = None
    with _inference(bank):
        for b in trunk_batches(bank, inputs, cache, batch_size, batches):
            hidden = bank.all_experts_hidden(b.states, b.attention_mask, names)  # [K, B, H]
            if out is None:
                out = hidden.new_empty((len(names), len(inputs), hidden.shape[-1]))
            out[:, b.index] = hidden
    return out if out is not None else torch.empty(len(names), 0, bank.hidden_size, device=bank.device)


def prompt_features(
    model,
    inputs: Sequence[EncodedInput],
    cache=None,
    batch_size: int = 16,
    desc: str | None = None,
) -> torch.Tensor:
    """The router's features of each input's prompt (:meth:`~dmoerm.router.Router.features`, the one
    definition, as :meth:`~dmoerm.model.DMoERM.route` reads them when scoring): [N, H] float32, on the bank's
    device."""
    bank = model.bank
    out = torch.empty(len(inputs), bank.hidden_size, device=bank.device)
    with _inference(model):
        for b in trunk_batches(bank, inputs, cache, batch_size, desc=desc):
            out[b.index] = model.router.features(b.states, b.prompt_mask.to(b.states.device))  # [B, H]
    return out


@dataclass
class DMoERMScores:
    """A DMoERM's outputs over N inputs, in their order."""

    reward: torch.Tensor
    """[N] float32 rewards."""
    category: list[str] = field(default_factory=list)
    """The category whose inner model scored each input (the most probable one)."""
    category_probability: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """[N] the router's probability of that category."""
    capability_scores: list[dict[str, float]] = field(default_factory=list)
    """Per input, each capability expert's scalar score (of the routed category)."""

    def outputs(self) -> list[RewardOutput]:
        return [
            RewardOutput(
                reward=float(self.reward[i]),
                category=self.category[i],
                category_probability=float(self.category_probability[i]),
                capability_scores=self.capability_scores[i],
            )
            for i in range(len(self.category))
        ]


def dmoerm_outputs(
    model,
    inputs: Sequence[EncodedInput],
    cache=None,
    batch_size: int = 16,
    batches: Sequence[Sequence[int]] | None = None,
    categories: Sequence[str] | None = None,
) -> DMoERMScores:
    """Score inputs with a DMoERM: route, inner models, rewards. A prompt is routed once per call
    (:meth:`~dmoerm.model.DMoERM.route`'s memo), so every response to it goes to the same inner model.

    ``categories`` (one per input) skips the router and sends each input to that category's inner model: with
    the records' labelled categories, the DMoERM a perfect router would give (an evaluation diagnostic)."""
    n = len(inputs)
    scores = DMoERMScores(torch.empty(n), [""] * n, torch.empty(n), [{} for _ in range(n)])
    memo: dict = {}  # prompt tokens -> router features, for this call
    sent = None if categories is None else _category_indices(model, categories, n)  # [N]
    with _inference(model):
        for b in trunk_batches(model.bank, inputs, cache, batch_size, batches):
            prompts = [inputs[i].input_ids[: inputs[i].prompt_length] for i in b.index]
            if sent is None:
                probs = model.route(b.states, b.prompt_mask.to(b.states.device), prompts, memo)  # [B, C]
            else:  # [B, C] one-hot on each input's given category
                probs = F.one_hot(sent[list(b.index)], len(model.categories)).float().to(b.states.device)
            res = model(b.states, b.attention_mask, b.prompt_mask, probs, b.input_ids)
            rows = torch.arange(len(b.index), device=res.category_probs.device)
            scores.reward[b.index] = res.reward.float().cpu()
            scores.category_probability[b.index] = res.category_probs[rows, res.category_index].float().cpu()
            for j, i in enumerate(b.index):
                scores.category[i] = model.categories[int(res.category_index[j])]
                scores.capability_scores[i] = res.capability_scores[j]
    return scores


def _category_indices(model, categories: Sequence[str], n: int) -> torch.Tensor:
    """[N] each input's position in ``model.categories``; a count or a name the model lacks is an error."""
    if len(categories) != n:
        raise ValueError(f"categories: {len(categories)} given for {n} inputs")
    unknown = sorted(set(categories) - set(model.categories))
    if unknown:
        raise ValueError(
            f"categories: {', '.join(unknown)} not among the model's ({', '.join(model.categories)})"
        )
    index = {c: i for i, c in enumerate(model.categories)}
    return torch.tensor([index[c] for c in categories], dtype=torch.long)
