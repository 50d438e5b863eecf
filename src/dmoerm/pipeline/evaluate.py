"""Stage ``eval``: every system of the run (DMoERM, its scoring-time ablations, the single reward model and
its ensembles) scored on the same held-back test records from cached trunk states, one ``eval/<system>/``
folder each. It reruns on every run (no fingerprint): scoring is cheap and the report reads its files.

:func:`score_cached`, :func:`standardized_scores` and :func:`_evaluate_ensemble` are the scoring and ensemble
helpers (also used by the scaling study and ``dmoerm.experiments``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dmoerm.encoding import EncodedInput
from dmoerm.model import DMoERM
from dmoerm.pipeline.config import PipelineConfig
from dmoerm.pipeline.files import write_eval
from dmoerm.pipeline.report import eval_folder
from dmoerm.pipeline.stages import Encoded, RunContext, RunData
from dmoerm.reward_model import RewardModel
from dmoerm.scoring import dmoerm_outputs, expert_rewards, flatten, in_order
from dmoerm.training.distributed import gather_lists, launched_world, rank_and_world, share
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


LABELLED = "labelled category"
"""The DMoERM with every test record sent to its labelled category: what a perfect router would give, so
DMoERM's row minus this one is what routing errors cost."""


def evaluation_stage(
    run: RunContext, model: DMoERM, data: RunData, items: Encoded, members: Sequence[RewardModel]
) -> tuple[dict, float]:
    """Score every system on the test records; write ``eval/<system>/``; time it as ``eval``.

    Returns (results by system name, the share of test records the router sends to their labelled category).
    """
    from dmoerm.evaluation import compute_metrics, response_token_lengths

    config, cache = run.config, run.cache
    t0 = time.perf_counter()
    test_recs = [r for c in data.categories for r in data.splits.test[c]]
    flat, where = flatten([it for c in data.categories for it in items["test"][c]])
    test_tokens = response_token_lengths(model.tokenizer, test_recs)
    mine = _my_share(len(flat))  # each rank scores (and so runs the trunk on) its share of the test inputs
    cache.get(model.bank, [flat[i] for i in mine], desc="test trunk" if run.progress else None)
    systems = _systems(config, members[0] if members else None)
    first = next(iter(systems))
    results = {}
    router_right = 0
    capability_scores: list[dict[str, float]] = []
    for name, system in systems.items():
        t1 = time.perf_counter()
        if system == "mean" and config.routing.mode == "top1" and not model.likelihood_weights:
            # The experts' mean is the mean of the capability scores the DMoERM pass already returned (same
            # routing, same experts): no second pass through the experts. With the likelihood term the
            # model's own pass adds it to the mean.
            rewards = torch.tensor([sum(c.values()) / len(c) for c in capability_scores])
        else:
            sent = None
            if system == LABELLED:  # every test record to its labelled category's inner model
                system, sent = (
                    "mlp",
                    [r.category for w, r in zip(where, test_recs) for _ in range(w.start, w.stop)],
                )
            if isinstance(system, str):
                model.routing = dataclasses.replace(config.routing, aggregation=system)
                system = model
            rewards, routed, scores = score_sharded(system, flat, cache, categories=sent)
            if name == first:
                capability_scores = scores
                router_right = sum(routed[w.start] == r.category for w, r in zip(where, test_recs))
        seconds = time.perf_counter() - t1
        per_record = [rewards[w].tolist() for w in where]
        result = compute_metrics(per_record, test_recs, token_lengths=test_tokens, system=name)
        write_eval(result, run.out / "eval" / eval_folder(name))
        results[name] = result
        logger.info(
            "%s: test agreement %.4f (%d responses scored in %.1fs from cached trunk states)",
            name,
            result.overall.agreement.value,
            len(flat),
            seconds,
        )
    model.routing = config.routing
    if config.baseline and config.ensemble_size > 1:
        results.update(
            _evaluate_ensemble(members, flat, where, test_recs, test_tokens, items["dev"], cache, run.out)
        )
    run.timings["eval"] = round(time.perf_counter() - t0, 2)
    return results, router_right / max(1, len(test_recs))


def _systems(config: PipelineConfig, baseline: RewardModel | None) -> dict:
    """System name -> DMoERM's aggregation (``mlp``, ``mean``, ``phase1``) or the single reward model."""
    # DMoERM, its two scoring-time ablations (issue 5: experts averaged instead of the MLP; the router with
    # each category's phase-1 model alone, i.e. one reward model per category) and the single reward model.
    systems: dict = {
        "DMoERM": "mlp",
        "DMoERM, experts averaged": "mean",
        "per-category RMs (routed)": "phase1",
        "DMoERM, labelled category": LABELLED,
    }
    if config.without_router:  # one inner model: its phase-1 model is one RM on phase 1 of every category
        systems = {"DMoERM without router": "mlp", "DMoERM without router, experts averaged": "mean"}
    if baseline is not None:
        systems["single RM"] = baseline
    return systems


def _my_share(n: int, batch_size: int = 16) -> range:
    """This rank's positions among ``n`` inputs: whole consecutive batches of ``batch_size`` (those
    :func:`score_cached` forms), so each input is scored in the very batch one process scores it in."""
    if launched_world() == 1:
        return range(n)
    rank, world = rank_and_world()
    batches = share(-(-n // batch_size), rank, world)
    return range(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


def score_sharded(
    model: DMoERM | RewardModel,
    inputs: Sequence[EncodedInput],
    cache: TrunkCache,
    batch_size: int = 16,
    categories: Sequence[str] | None = None,
):
    """:func:`score_cached`, each rank scoring its share of the batches (:func:`_my_share`) and every rank
    getting all the outputs, in order. Under one process: :func:`score_cached` itself."""
    if launched_world() == 1:
        return score_cached(model, inputs, cache, batch_size, categories)
    mine = _my_share(len(inputs), batch_size)
    part = None  # a rank with no batch (fewer batches than ranks) sends nothing
    if len(mine):
        sent = None if categories is None else list(categories)[mine.start : mine.stop]
        rewards, routed, scores = score_cached(
            model, list(inputs)[mine.start : mine.stop], cache, batch_size, sent
        )
        part = (rewards.cpu(), routed, scores)
    parts = [p for p in gather_lists([part]) if p is not None]
    if not parts:
        return torch.empty(0), [], []
    rewards = torch.cat([p[0] for p in parts])
    return rewards, [x for p in parts for x in p[1]], [x for p in parts for x in p[2]]


def score_cached(
    model: DMoERM | RewardModel,
    inputs: Sequence[EncodedInput],
    cache: TrunkCache,
    batch_size: int = 16,
    categories: Sequence[str] | None = None,
):
    """Score encoded inputs reading trunk states from ``cache`` (shared by every model on the same trunk);
    a DMoERM with ``categories`` sends each input to that category instead of routing it.

    Returns (rewards [N], routed category per input or None, capability scores per input)."""
    batches = in_order(len(inputs), batch_size)  # consecutive batches, as this evaluation always scored
    if isinstance(model, DMoERM):
        out = dmoerm_outputs(model, inputs, cache, batches=batches, categories=categories)
        return out.reward, out.category, out.capability_scores
    rewards = expert_rewards(model.bank, RewardModel.EXPERT, inputs, cache, batches=batches)
    return rewards, [None] * len(inputs), [{} for _ in inputs]


def standardized_scores(
    members: Sequence[RewardModel],
    inputs: Sequence[EncodedInput],
    dev: Sequence[EncodedInput],
    cache: TrunkCache,
) -> torch.Tensor:
    """Each member's rewards of ``inputs``, standardised by its mean and std on ``dev``: [N members, inputs].

    Ensemble rules need members on one scale: the worst case and the variance would otherwise compare offsets
    (Coste et al. 2023 normalise their members the same way).
    """
    scores = []
    for member in members:
        on_dev, _, _ = score_sharded(member, dev, cache)
        on_inputs, _, _ = score_sharded(member, inputs, cache)
        scores.append((on_inputs - on_dev.mean()) / on_dev.std().clamp(min=1e-6))
    return torch.stack(scores)


def _evaluate_ensemble(members, flat, where, test_recs, test_tokens, dev_items, cache, out: Path) -> dict:
    """Mean, worst-case and uncertainty-weighted ensembles of single reward models on the test inputs.

    Each member's rewards are standardised with its mean and std on the dev inputs first, so the worst case
    and the variance compare like with like (Coste et al. 2023 normalise their members the same way).
    """
    from dmoerm.evaluation import ENSEMBLE_RULES, combine_rewards, compute_metrics

    dev_flat, _ = flatten([it for items in dev_items.values() for it in items])
    stacked = standardized_scores(members, flat, dev_flat, cache)  # [N, responses]
    results = {}
    for rule in ENSEMBLE_RULES:
        name = f"RM ensemble ({rule}, N={len(members)})"
        combined = combine_rewards(stacked, rule)
        result = compute_metrics(
            [combined[w].tolist() for w in where], test_recs, token_lengths=test_tokens, system=name
        )
        write_eval(result, out / "eval" / eval_folder(name))
        results[name] = result
    return results
