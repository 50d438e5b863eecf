"""The training stages of a run, in the order :func:`~dmoerm.pipeline.run.run_pipeline` calls them: the data
(splits), the router, the warm start, per category phase 1, its labels and capability experts (phase 2) and
its aggregator (phase 3), then the single reward model baseline (and its ensemble siblings).

Each stage is one function of the run's shared :class:`RunContext` and its explicit inputs. A stage named
``<kind>/<category>[/<capability>]`` is skipped when ``state.json`` records it finished; the config fields it
depends on (its fingerprint, checked on resume) are those of its kind in :func:`dmoerm.pipeline.state.stage_inputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dmoerm.data import load_data
from dmoerm.encoding import EncodedInput, RankedItem, encode_prompt, encode_record
from dmoerm.labelling.human import expert_agreement, plan_category_labels
from dmoerm.likelihood import fit_likelihood_weights
from dmoerm.model import DMoERM, capability_expert_name, rm_expert
from dmoerm.pipeline.config import PipelineConfig
from dmoerm.pipeline.files import save_curves, save_model, save_records, save_rng_state, write_json
from dmoerm.pipeline.labels import _judge_only, _Labeller, _read_category_labels
from dmoerm.pipeline.splits import POOLED, Splits, build_splits, held_out_prompts, load_preferences
from dmoerm.pipeline.state import RNG_FILE, StageState, checkpoint_dir, label_file
from dmoerm.reward_model import RewardModel
from dmoerm.taxonomy import Taxonomy, assign_categories, load_taxonomy
from dmoerm.tracking import Tracker
from dmoerm.training.distributed import on_main
from dmoerm.training.phases import (
    WARM_START,
    labels_to_items,
    train_phase1,
    train_phase2,
    train_phase3,
    train_router,
    train_warm_start,
)
from dmoerm.training.single import train_reward_model
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)

Encoded = dict[str, dict[str, list[RankedItem]]]
"""Encoded records of each split (``phase1``, ``phase3``, ``dev``, ``test``) per category."""


@dataclass
class RunContext:
    """What every stage shares: the config, the run folder and its resume state, the tracker, the trunk cache."""

    config: PipelineConfig
    """The resolved config (``config.yaml``)."""
    out: Path
    """The run folder (``config.output_dir``)."""
    stages: StageState
    """Finished stages and their fingerprints (``state.json``)."""
    tracker: Tracker
    """Experiment tracking of every stage's numbers and curves (``config.report_to``)."""
    cache: TrunkCache
    """Frozen trunk states, shared by every stage (and by runs on the same backbone)."""
    timings: dict[str, float]
    """Seconds per stage, recorded in state.json's ``_timings`` and the report."""
    progress: bool = True
    """Progress bars of training and labelling."""

    def record(self, stage: str, t0: float, info=None, history=None, model=None, track: bool = True) -> None:
        """Mark ``stage`` finished: ``model`` saved first (when the stage trained it), its time and ``info``
        recorded in state.json, its numbers sent to the tracker."""
        if model is not None:
            save_model(model, self.out / "model")
        self.timings[stage] = round(time.perf_counter() - t0, 2)
        save_rng_state(self.out / RNG_FILE, stage)  # first: a kill between the two writes restores nothing
        self.stages.finish(stage, info)
        self.stages.finish("_timings", self.timings)
        if track:
            self.tracker.log_stage(stage, info, history)


@dataclass
class RunData:
    """The run's records: what the data stage gives every later stage."""

    taxonomy: Taxonomy
    """The model's taxonomy (one ``pooled`` category in the "without router" ablation)."""
    label_taxonomy: Taxonomy
    """The judge's: it asks about each record's own category's points."""
    categories: list[str]
    """Categories with an inner model, in training order."""
    splits: Splits
    """Per-category records of every phase (pooled in the "without router" ablation)."""
    held_out: set[tuple]
    """Prompt keys of phase 3, dev and test: no capability label on them trains an expert."""


def data_stage(config: PipelineConfig, out: Path) -> RunData:
    """Load the preference data, draw the prompt-disjoint splits; write ``sizes.json`` and ``splits/*.jsonl``."""
    taxonomy = load_taxonomy(config.data.taxonomy)
    records = load_preferences(config.data, taxonomy)
    counts = Counter(r.category for r in records)
    categories = config.data.categories or [c.name for c in taxonomy.categories if counts.get(c.name)]
    missing = [c for c in categories if c not in taxonomy.category_names]
    if missing:
        raise ValueError(f"data.categories: {missing} are not categories of taxonomy {taxonomy.name!r}")
    splits = build_splits([r for r in records if r.category in categories], categories, config.data)
    empty = [c for c, s in splits.sizes().items() if not s["phase1"] or not s["test"]]
    if empty:
        raise ValueError(
            f"data: categories {empty} have no phase-1 or test records; drop them from data.categories"
        )
    label_taxonomy = taxonomy
    if config.without_router:
        taxonomy, splits, categories = taxonomy.pooled(POOLED), splits.pooled(POOLED), [POOLED]
    sizes = splits.sizes()
    logger.info("sizes per category (records): %s", json.dumps(sizes))
    write_json(out / "sizes.json", sizes)
    # The exact records of every split, so any other system (an LLM judge: ``dmoerm eval-judge --data
    # runs/main/splits/test.jsonl``) is evaluated on the same held-back pairs.
    for name in ("phase1", "phase3", "dev", "test"):
        save_records(
            [r for recs in getattr(splits, name).values() for r in recs], out / "splits" / f"{name}.jsonl"
        )
    return RunData(taxonomy, label_taxonomy, categories, splits, held_out_prompts(splits))


def encode_splits(model: DMoERM, data: RunData) -> Encoded:
    """Every split's records encoded with the model's tokenizer and length limit."""
    tok, n = model.tokenizer, model.max_length
    return {
        name: {c: [encode_record(tok, r, n) for r in getattr(data.splits, name)[c]] for c in data.categories}
        for name in ("phase1", "phase3", "dev", "test")
    }


def router_stage(run: RunContext, model: DMoERM, data: RunData, items: Encoded) -> None:
    """Stage ``router``: the prompt classifier on the router sources' prompts plus the training records' own."""
    if "router" in run.stages:
        return
    t0 = time.perf_counter()
    if len(data.categories) == 1:
        info = {"accuracy": 1.0, "per_category": {}, "train_prompts": 0, "dev_prompts": 0}
        run.record("router", t0, dict(info, note="one category: nothing to route"), model=model)
        return
    config, cats, tok, n = run.config.data, data.categories, model.tokenizer, model.max_length
    train = _prompt_inputs(
        tok, _router_records(config, data, config.router_sources, config.router_prompts), n
    )
    # The preference records' own prompts are routed by the prompt part of their full inputs (causal
    # attention: identical trunk states), whose trunk states phases 1 and 3 then reuse from the cache.
    train += [(it.inputs[0], c) for name in ("phase1", "phase3") for c in cats for it in items[name][c]]
    dev = _prompt_inputs(
        tok, _router_records(config, data, config.router_dev_sources, config.router_dev_prompts), n
    )
    dev += [(it.inputs[0], c) for c in cats for it in items["dev"][c]]
    logger.info("router: %d training and %d dev prompts", len(train), len(dev))
    result = train_router(model, train, dev, run.config.router, run.cache, progress=run.progress)
    save_curves(result.history, run.out / "curves" / "router.png", "router (cross-entropy)")
    info = {
        "accuracy": result.dev_accuracy,  # the state's key (unchanged) for the dev accuracy
        "per_category": result.per_category,
    }
    info.update(train_prompts=len(train), dev_prompts=len(dev))
    run.record("router", t0, info, result.history, model=model)


def _router_records(config, data: RunData, sources, limit: int):
    """At most ``limit`` records of ``sources`` with one of the run's categories, shuffled by the data seed."""
    recs = []
    for s in sources:
        recs.extend(assign_categories(load_data(s, config.data_dir), data.taxonomy))
    recs = [r for r in recs if r.category in data.categories]
    random.Random(config.seed).shuffle(recs)
    return recs[:limit]


def _prompt_inputs(tokenizer, records, max_length: int) -> list[tuple[EncodedInput, str]]:
    return [(encode_prompt(tokenizer, r.conversation, max_length), r.category) for r in records if r.category]


def warm_start_stage(run: RunContext, model: DMoERM, data: RunData, items: Encoded) -> list[RewardModel]:
    """Where every category's phase 1 starts (``warm_start``): ``baseline`` trains the single reward models
    first (returned) and copies the first into the model; ``phase1`` trains stage ``warm_start`` on every
    category's phase-1 records; ``none`` does nothing."""
    config = run.config
    if config.warm_start == "baseline":
        members = baseline_stage(run, data)
        if WARM_START not in model.bank.heads:
            model.bank.import_expert(members[0].bank, RewardModel.EXPERT, WARM_START)
        return members
    if config.warm_start == "phase1" and "warm_start" not in run.stages:
        t0 = time.perf_counter()
        res = train_warm_start(
            model,
            [it for c in data.categories for it in items["phase1"][c]],
            [it for c in data.categories for it in items["dev"][c]],
            config.phase1,
            run.cache,
            checkpoint_dir=checkpoint_dir(run.out, "warm_start"),
            progress=run.progress,
        )
        save_curves(
            res.history, run.out / "curves" / "warm_start.png", "warm start: every category's phase 1"
        )
        run.record("warm_start", t0, result_info(res), res.history, model=model)
    return []


def result_info(res) -> dict:
    """What state.json keeps of a training result: best dev agreement and steps, and
    :func:`length_info`."""
    return {"best_dev_agreement": res.best_dev_agreement, "steps": res.steps, **length_info(res)}


def length_info(res) -> dict:
    """With ``length_covariate``: the coefficient on log tokens the result's loss added; else nothing."""
    return (
        {}
        if res is None or res.length_coefficient is None
        else {"length_coefficient": res.length_coefficient}
    )


def phase1_stage(run: RunContext, model: DMoERM, category: str, items: Encoded) -> None:
    """Stage ``phase1/<category>``: the category's reward model on its phase-1 human rankings (with
    ``specialise.replay``, some of the other categories' too)."""
    stage = f"phase1/{category}"
    if stage in run.stages:
        return
    t0 = time.perf_counter()
    config = run.config
    train = items["phase1"][category] + replay_items(config, items["phase1"], category)
    optim = config.phase1
    if config.warm_start != "none" and config.specialise.learning_rate is not None:
        optim = dataclasses.replace(optim, learning_rate=config.specialise.learning_rate)
    gated = config.warm_start != "none" and config.specialise.gate_alpha < 1.0
    dev, gate = gate_split(config, items["dev"][category], gated)
    res = train_phase1(
        model,
        category,
        train,
        dev,
        optim,
        run.cache,
        checkpoint_dir=checkpoint_dir(run.out, "phase1", category),
        progress=run.progress,
        init_from=WARM_START if config.warm_start != "none" else None,
        gate_alpha=config.specialise.gate_alpha,
        gate_items=gate,
        cross_fit=config.specialise.gate_cross_fit,
    )
    save_curves(res.history, run.out / "curves" / f"{category}_phase1.png", f"{category}: phase 1")
    info = result_info(res)
    if res.gate:
        info["gate"] = res.gate
    if len(train) > len(items["phase1"][category]):
        info["replayed_records"] = len(train) - len(items["phase1"][category])
    run.record(stage, t0, info, res.history, model=model)


def gate_split(config: PipelineConfig, dev: list, gated: bool = True) -> tuple[list, list | None]:
    """A category's dev items as (early stopping's, the gate's or None): with ``specialise.gate_share`` > 0
    and the phase ``gated``, its last share (dev is drawn in a seeded random order, so this is a random
    subset, the same on every rerun and rank) goes to the gate alone; an ungated phase early-stops on all."""
    k = min(round(config.specialise.gate_share * len(dev)), len(dev) - 1)  # early stopping keeps one at least
    if k <= 0 or not gated:
        return dev, None
    return dev[: len(dev) - k], dev[len(dev) - k :]


def replay_items(config: PipelineConfig, phase1: dict[str, list], category: str) -> list:
    """``specialise.replay`` times the category's phase-1 count of the other categories' phase-1 items
    (all of them when they hold fewer), drawn with ``data.seed`` and the category's name: the same on every
    rerun and rank."""
    others = [it for c, its in phase1.items() if c != category for it in its]
    k = min(len(others), round(config.specialise.replay * len(phase1[category])))
    if k <= 0:
        return []
    return random.Random(f"{config.data.seed}:{category}:replay").sample(others, k)


def capability_stages(
    run: RunContext, model: DMoERM, data: RunData, labeller: _Labeller, category: str
) -> dict[str, int]:
    """Phase 2 of one category: its records labelled (stage ``labels/<category>``), each capability point's
    labels planned, one expert per point with enough of them (stages ``phase2/<category>/<point>``).

    Returns the kept labels per capability point, experts or not (the report's table)."""
    label_counts: dict[str, int] = {}
    if run.config.labels.source == "none":
        return label_counts
    path = labels_stage(run, labeller, category, data.splits.to_label[category])
    plan = _label_plan(run.config, data, category, path)
    for cap in next(x for x in data.taxonomy.categories if x.name == category).capabilities:
        label_counts[cap.name] = len(plan.train.get(cap.name, [])) or plan.dropped.get(cap.name, 0)
        if cap.name not in plan.train:
            logger.warning(
                "%s/%s: %d kept labels (< %d) from %s: no expert",
                category,
                cap.name,
                plan.dropped.get(cap.name, 0),
                run.config.labels.min_labels,
                plan.sources.get(cap.name),
            )
            continue
        expert_stage(run, model, category, cap.name, plan)
    return label_counts


def labels_stage(run: RunContext, labeller: _Labeller, category: str, records) -> Path:
    """Stage ``labels/<category>``: the judge labels the records' pairs per capability point; the file.

    Under several processes rank 0 alone asks the judge and writes the file and the judge's cache (one
    SQLite writer, no question asked twice); the others wait for its stats, then read the same file."""
    stage, path = f"labels/{category}", label_file(run.out, category)
    if stage not in run.stages:
        t0 = time.perf_counter()
        run.record(stage, t0, on_main(lambda: labeller(records, path)))
    return path


def _label_plan(config: PipelineConfig, data: RunData, category: str, path: Path):
    """Each capability point's training and held-back labels (judge or bundled human labels)."""
    labels = _read_category_labels(config, path, None if config.without_router else category, data.held_out)
    if config.without_router:  # every category's labels feed the one pooled inner model
        labels = [dataclasses.replace(lab, category=category) for lab in labels]
    return plan_category_labels(
        data.taxonomy if config.labels.human_sources else _judge_only(data.taxonomy),
        category,
        labels,
        min_labels=config.labels.min_labels,
        held_back_share=config.labels.held_back_share,
        data_dir=config.data.data_dir,
        limit=config.labels.human_limit,
        seed=config.data.seed,
        exclude_prompts=data.held_out,
    )


def expert_stage(run: RunContext, model: DMoERM, category: str, capability: str, plan) -> None:
    """Stage ``phase2/<category>/<capability>``: one capability expert on its planned labels, its agreement
    with the held-back labels of its own capability recorded."""
    stage = f"phase2/{category}/{capability}"
    if stage in run.stages:
        return
    t0 = time.perf_counter()
    res = train_phase2(
        model,
        category,
        capability,
        labels_to_items(plan.train[capability], model.tokenizer, model.max_length),
        [],
        run.config.phase2,
        run.cache,
        checkpoint_dir=checkpoint_dir(run.out, "phase2", category, capability),
        progress=run.progress,
    )
    held = expert_agreement(
        model, capability_expert_name(category, capability), plan.held_back.get(capability, []), run.cache
    )
    info = {"labels": len(plan.train[capability]), "source": plan.sources.get(capability), **length_info(res)}
    run.record(stage, t0, dict(info, steps=res.steps, held_back=held), res.history, model=model)


def phase3_stage(
    run: RunContext, model: DMoERM, category: str, items: Encoded, label_counts: dict[str, int]
) -> None:
    """Stage ``phase3/<category>``: the aggregator over the category's experts on its phase-3 rankings."""
    stage = f"phase3/{category}"
    if stage in run.stages:
        return
    t0 = time.perf_counter()
    names = model.category_experts(category) or [rm_expert(category)]
    if names == [rm_expert(category)] and not run.config.specialise.shared_expert:
        logger.warning("%s: no capability experts; phase 3 aggregates the phase-1 model alone", category)
    if run.config.specialise.shared_expert:
        names = [*names, WARM_START]  # the pooled start, shared by every category's aggregator
    gated = run.config.phase3.aggregator != "mlp" and run.config.phase3.gate_alpha < 1.0
    dev, gate = gate_split(run.config, items["dev"][category], gated)
    res = train_phase3(
        model,
        category,
        items["phase3"][category],
        dev,
        run.config.phase3,
        run.cache,
        experts=names,
        gate_items=gate,
        cross_fit=run.config.specialise.gate_cross_fit,
    )
    save_curves(res.history, run.out / "curves" / f"{category}_phase3.png", f"{category}: phase 3 aggregator")
    info = {"experts": model.aggregator_experts[category], "label_counts": label_counts}
    if res.gate:
        info["gate"] = res.gate
    run.record(stage, t0, dict(info, **result_info(res)), res.history, model=model)


def likelihood_stage(run: RunContext, model: DMoERM, data: RunData, items: Encoded) -> None:
    """Stage ``likelihood``: the weight of the backbone's likelihood of a response in DMoERM's reward, fitted on
    every category's dev records after phase 3 (``config.likelihood``). Not recorded with ``fit: none``, which
    only clears weights a restarted run left in the model."""
    fit = run.config.likelihood.fit
    if "likelihood" in run.stages or (fit == "none" and not model.likelihood_weights):
        return
    if fit == "none":
        model.likelihood_weights = {}
        save_model(model, run.out / "model")
        return
    t0 = time.perf_counter()
    dev = [item for c in data.categories for item in items["dev"][c]]
    info = fit_likelihood_weights(model, dev, run.cache, fit, run.config.likelihood.max_weight)
    logger.info("likelihood: weights %s; dev agreement %s", info["weights"], info["dev_agreement"])
    run.record("likelihood", t0, info, model=model)


def baseline_stage(run: RunContext, data: RunData) -> list[RewardModel]:
    """Stages ``baseline`` (and ``baseline_seed<i>`` with ``ensemble_size``): the single reward model on
    phase 1 + phase 3 of every category, and its seeded siblings; finished ones are loaded. Returns the
    members, the baseline first."""
    config, splits, categories = run.config, data.splits, data.categories
    train_recs = [r for c in categories for r in splits.phase1[c] + splits.phase3[c]]
    dev_recs = [r for c in categories for r in splits.dev[c]]
    members = []
    for i in range(max(1, config.ensemble_size)):
        name = "baseline" if i == 0 else f"baseline_seed{i}"
        t0 = time.perf_counter()
        torch.manual_seed(config.phase1.seed + i)  # each member's value head starts differently
        member, res = train_reward_model(
            train_recs,
            dev_recs,
            config.model,
            dataclasses.replace(config.phase1, seed=config.phase1.seed + i),
            run.out / name,
            cache=run.cache,
            progress=run.progress,
        )
        members.append(member)
        if name not in run.stages:
            run.record(name, t0, {"train_records": len(train_recs), **length_info(res)}, track=False)
            if res is not None:  # None: trained by a run that stopped before recording it
                run.tracker.log_stage(name, {"best_dev_agreement": res.best_dev_agreement}, res.history)
    return members
