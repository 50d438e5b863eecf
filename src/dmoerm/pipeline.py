"""The whole job, from data to a scored reward: router, the three phases of every category, the single
reward model baseline on the same data and budget, and their evaluation side by side.

Resumable: every finished stage is recorded in ``<output_dir>/state.json`` after its outputs are saved
(the model directory is replaced atomically), and a rerun skips it; an interrupted training stage resumes
from its last epoch checkpoint. Nothing finished is lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dmoerm.config_check import RunStopped, check_instance
from dmoerm.data import PreferenceRecord, load_data, save_jsonl, split_by_prompt, with_label_noise
from dmoerm.encoding import EncodedInput, RankedItem, encode_prompt, encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.labelling.human import expert_agreement, plan_category_labels
from dmoerm.model import DMoERM, RoutingConfig, capability_expert_name, new_dmoerm, rm_expert
from dmoerm.reward_model import MODEL_FILE, RewardModel
from dmoerm.run_state import StageState, forget_lost_model_stages, hide_library_bars, load_run_model
from dmoerm.taxonomy import assign_categories, load_taxonomy
from dmoerm.tracking import Tracker, check_report_to
from dmoerm.training.loop import TrainConfig, TrunkCache, pad_states, save_curves
from dmoerm.training.phases import (
    WARM_START,
    AggregatorTrainConfig,
    RouterTrainConfig,
    labels_to_items,
    train_phase1,
    train_phase2,
    train_phase3,
    train_router,
    train_warm_start,
)
from dmoerm.training.single import train_reward_model

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which data feeds which phase, and how much of it (sizes are per category)."""

    sources: list[str] = field(default_factory=lambda: ["rmb/pairwise"])
    """Human preference data: bundled source names (see ``dmoerm.data.SOURCES``) or JSONL files."""
    router_sources: list[str] = field(default_factory=lambda: ["autoj/train"])
    """Prompts with known categories for the router (the preference data's own prompts are added)."""
    router_dev_sources: list[str] = field(default_factory=lambda: ["autoj/test"])
    """Held-back prompts with categories for the router's per-category accuracy."""
    taxonomy: str = "default"
    """Taxonomy preset name or file."""
    categories: list[str] | None = None
    """Categories to build inner models for; None means every taxonomy category with data."""
    phase1_records: int = 48
    """Human rankings per category for phase 1."""
    label_records: int = 16
    """Phase-1 records per category whose pairs the judge labels per capability point (phase 2)."""
    phase3_records: int = 32
    """Human rankings per category for phase 3 (disjoint by prompt from phase 1 and the labels)."""
    dev_records: int = 8
    """Held-back rankings per category for early stopping."""
    test_records: int = 40
    """Held-back rankings per category for the final comparison."""
    router_prompts: int = 400
    """Router training prompts from ``router_sources`` at most (plus the training records' prompts)."""
    router_dev_prompts: int = 200
    """Router dev prompts from ``router_dev_sources`` at most."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    seed: int = 0
    """Seed of the prompt-disjoint splits and the sampling."""
    label_noise: float = 0.0
    """Share of phase-1 and phase-3 human rankings reversed before training (dev and test stay clean): the
    proxies of the over-optimisation experiment (``dmoerm overopt``; Coste et al. 2023 flip 25%)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(
                f"label_noise: {self.label_noise} must be in [0, 0.5); 0.25 flips a quarter of the rankings"
            )
        for name in ("phase1_records", "phase3_records", "test_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("label_records", "dev_records", "router_prompts", "router_dev_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.label_records > self.phase1_records:
            raise ValueError(
                "label_records: labelled records are drawn from phase 1's; use at most phase1_records"
            )
        if not self.sources:
            raise ValueError("sources: name at least one preference data source")


@dataclass
class LabelsConfig:
    """Where phase 2's capability labels come from."""

    source: str = "local"
    """``local`` or ``openai``: an LLM judge (see ``dmoerm label``); ``file``: an existing label JSONL;
    ``none``: skip phase 2 (phase 3 then aggregates the phase-1 model alone, the "without phase 2" ablation)."""
    file: str | None = None
    """Label JSONL (the CapabilityLabel schema) when ``source`` is ``file``."""
    judge: dict = field(default_factory=dict)
    """Judge options passed to :class:`dmoerm.labelling.pipeline.LabelConfig` (model, base_url, api_key_env,
    consistency, batch_size, ...)."""
    min_labels: int = 4
    """Capability points with fewer kept (untied) labels get no expert, with a log line; the category's
    aggregator then reads the experts that exist (or its phase-1 model alone)."""
    human_sources: bool = True
    """Take each capability point's labels from the taxonomy's ``label_source`` (a bundled human-labelled set
    where it names one); False sends every point to the judge, as the paper does."""
    human_limit: int = 96
    """Labels per capability point at most from a bundled human-labelled source (the taxonomy's
    ``label_source``: FineGrainedRLHF aspects, hh-rlhf harmless, LLMBar), drawn deterministically."""
    held_back_share: float = 0.2
    """Share of each capability point's labels (by prompt) held back to measure its expert's agreement with
    labels of its own capability (in state.json and the report)."""
    max_failed_share: float = 0.0
    """Share of a category's judge questions that may fail (judge down after its retries) with the run going
    on in a degraded state, recorded in state.json (``degraded``) and report.md. Above it the run stops with
    an error; the failed questions are never cached and a rerun asks only them. 0 (default): any failure
    stops the run."""

    def __post_init__(self) -> None:
        if self.source not in ("local", "openai", "file", "none"):
            raise ValueError(f"source: {self.source!r} is not one of local, openai, file, none")
        if self.source == "file" and not self.file:
            raise ValueError("file: source=file needs the label JSONL path")
        if not 0.0 <= self.held_back_share < 1.0:
            raise ValueError(f"held_back_share: {self.held_back_share} must be in [0, 1)")

        if self.min_labels < 1:
            raise ValueError(f"min_labels: must be >= 1, got {self.min_labels}")
        if not 0.0 <= self.max_failed_share <= 1.0:
            raise ValueError(f"max_failed_share: must be in [0, 1], got {self.max_failed_share}")
        if self.source in ("local", "openai"):
            judge_label_config(self, "labels.jsonl", "judge.cache.sqlite")  # judge options checked now


_JUDGE_SET_BY_PIPELINE = ("backend", "data", "out", "taxonomy", "limit", "default_category", "capabilities")


def judge_label_config(labels: LabelsConfig, out: str, cache: str):
    """The :class:`~dmoerm.labelling.pipeline.LabelConfig` of the run's judge, every option of
    ``labels.judge`` typed and checked (errors name ``judge.<field>``)."""
    from dmoerm.config_check import ConfigError, build
    from dmoerm.labelling.pipeline import LabelConfig

    judge = dict(labels.judge)
    secret = [k for k in judge if "key" in str(k).lower() and k != "api_key_env"]
    if secret:  # never echo the value: it may be a credential
        raise ConfigError(
            f"judge.{secret[0]}: not an option; the API key is never configured (nor written to config.yaml): "
            "put it in an environment variable and set judge.api_key_env to that variable's name"
        )
    taken = sorted(k for k in judge if k in _JUDGE_SET_BY_PIPELINE or k == "stats_out")
    if taken:
        raise ConfigError(f"judge: {', '.join(taken)} are set by the pipeline (labels.source and data)")
    backend = "openai" if labels.source == "openai" else "local"
    # The paper's rule by default: a label is kept only when both orders name the same response.
    obj = {
        "cache": cache,
        "consistency": "strict",
        **judge,
        "data": ["pipeline"],
        "out": out,
        "backend": backend,
    }
    return build(LabelConfig, obj, "judge")


WARM_STARTS = ("none", "phase1", "baseline")


@dataclass
class PipelineConfig:
    """``dmoerm train --config FILE``: everything the job does, saved resolved beside its outputs."""

    output_dir: str = "runs/main"
    """Where the model, the baseline, labels, curves, the report and the resume state go."""
    resume: str = "check"
    """A rerun in ``output_dir`` whose config changed an input of a recorded stage: ``check`` stops with an
    error naming the changed fields; ``restart`` trains that stage and every stage after it again (``dmoerm
    train --restart-changed``); unchanged finished stages are kept either way."""
    model: BackboneConfig = field(default_factory=BackboneConfig)
    """Backbone, split and LoRA settings (shared by DMoERM and the single reward model)."""
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    router: RouterTrainConfig = field(default_factory=RouterTrainConfig)
    phase1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, learning_rate=1e-3))
    """Phase 1 (and the single reward model: same data, same budget)."""
    phase2: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, learning_rate=5e-4, early_stopping_patience=0)
    )
    """Each capability expert."""
    phase3: AggregatorTrainConfig = field(default_factory=AggregatorTrainConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    baseline: bool = True
    """Also train the single reward model on phase 1 + phase 3 data of every category and compare."""
    ensemble_size: int = 0
    """Also train this many single reward models on the same data, seeds ``phase1.seed + i`` (the first is the
    baseline), and evaluate their mean, worst-case and uncertainty-weighted combinations (Coste et al. 2023,
    members normalised on the dev set); 0 or 1 for none."""
    trunk_cache_gb: float = 6.0
    """Memory bound of the trunk-state cache."""
    warm_start: str = "none"
    """Where every category's phase 1 starts (issue 13). ``none``: the base LM (the paper's cold start).
    ``phase1``: one reward model trained on every category's phase-1 records (stage ``warm_start``), so phase 3
    still sees no record its inner model trained on. ``baseline``: the single reward model (phase 1 + phase 3
    of every category; trained once, before the inner models, and reused). Either way the category's phase 1
    then specialises it, keeping the start when specialising does not beat it on dev."""
    trunk_cache_dir: str | None = None
    """Folder of the on-disk trunk-state cache shared between runs; None keeps states in memory only."""
    without_router: bool = False
    """The "without router" ablation (issue 5): one inner model for every category, no router. The splits
    are drawn per category as usual (same test records, per-category rows by the records' own categories);
    then every category's records go to one category ``pooled`` whose capability points are all the categories'
    points, each record judged on its own category's points and the labels pooled by point."""
    report_to: str = "none"
    """Experiment tracking of every stage's curves and numbers: ``none``, ``tensorboard`` or ``wandb``
    (``dmoerm.tracking``; needs ``pip install 'dmoerm[track]'``; ``WANDB_MODE=offline`` needs no network)."""

    def __post_init__(self) -> None:
        if self.resume not in ("check", "restart"):
            raise ValueError(f"resume: {self.resume!r} is not one of check, restart")
        if self.ensemble_size < 0:
            raise ValueError(f"ensemble_size: must be >= 0, got {self.ensemble_size}")
        if self.ensemble_size > 1 and not self.baseline:
            raise ValueError("ensemble_size: the ensemble's first member is the baseline; set baseline: true")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start: {self.warm_start!r} is not one of {', '.join(WARM_STARTS)}")
        if self.warm_start == "baseline" and not self.baseline:
            raise ValueError("warm_start: 'baseline' starts from the single reward model; set baseline: true")
        if self.trunk_cache_gb <= 0:
            raise ValueError(f"trunk_cache_gb: must be > 0, got {self.trunk_cache_gb}")
        check_report_to(self.report_to)

    @classmethod
    def from_dict(cls, obj: dict) -> PipelineConfig:
        """Build from nested dicts (a YAML/JSON file); unknown keys are errors naming the section."""
        return _from_dict(cls, obj, "config")

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
        """Read a YAML/JSON config; ``overrides`` are ``section.field=value`` strings (value in YAML syntax)
        applied on top, e.g. ``phase1.length_penalty=1.0`` or ``data.sources=[rmb/pairwise]``."""
        import yaml

        obj = _read_config_file(Path(path))
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r}: use section.field=value, e.g. phase1.epochs=2")
            node = obj
            *parents, last = key.strip().split(".")
            for part in parents:
                child = node.setdefault(part, {})
                if child is None:  # an empty section in the file (``phase1:``)
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
                node = child
            try:
                node[last] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        try:
            return cls.from_dict(obj)
        except (ValueError, TypeError) as e:
            shown = [_redacted(item) for item in overrides]
            where = f"{path} with overrides {shown}" if overrides else str(path)
            raise ValueError(f"{where}: {e}") from None


def _from_dict(cls, obj: dict, where: str):
    from dmoerm.config_check import build

    return build(cls, obj, "" if where == "config" else where, root=where)


def _redacted(override: str) -> str:
    """An override as errors show it: the value of a ``...key...=`` override (a credential?) hidden."""
    key, sep, _ = override.partition("=")
    return f"{key}=***" if sep and "key" in key.lower() and not key.endswith("api_key_env") else override


def _read_config_file(path: Path) -> dict:
    """The mapping of a YAML/JSON config file; a syntax error names the file and line."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{path}{line}: not valid YAML ({problem})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a mapping of sections (data:, model:, ...), got {type(obj).__name__}"
        )
    return obj


# --------------------------------------------------------------------------------------------- stages
def _save_atomically(model, directory: Path) -> None:
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


POOLED = "pooled"
"""The one category of the "without router" ablation."""


@dataclass
class Splits:
    """Per-category record lists of every phase."""

    phase1: dict[str, list[PreferenceRecord]]
    labels: dict[str, list[PreferenceRecord]]
    phase3: dict[str, list[PreferenceRecord]]
    dev: dict[str, list[PreferenceRecord]]
    test: dict[str, list[PreferenceRecord]]

    def pooled(self, name: str) -> Splits:
        """Every category's records of each phase under one category ``name`` (records keep their own
        ``category``)."""
        return Splits(
            **{
                f.name: {name: [r for recs in getattr(self, f.name).values() for r in recs]}
                for f in fields(self)
            }
        )

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            c: {k: len(getattr(self, k)[c]) for k in ("phase1", "labels", "phase3", "dev", "test")}
            for c in self.phase1
        }


def build_splits(
    records: Sequence[PreferenceRecord], categories: Sequence[str], config: DataConfig
) -> Splits:
    """Prompt-disjoint phases: train/dev/test by prompt, then train into phase 1 / phase 3 by prompt.

    The labelled records are drawn from phase 1, so nothing used in phase 1 or to derive capability labels
    is trained on in phase 3 or evaluated on (the paper's phases are disjoint; the authors' code swapped its
    train and validation splits).
    """
    top = split_by_prompt(records, {"train": 0.8, "dev": 0.1, "test": 0.1}, seed=config.seed)
    halves = split_by_prompt(top["train"], {"phase1": 0.5, "phase3": 0.5}, seed=config.seed + 1)
    rng = random.Random(config.seed)

    def take(recs, n):
        by_cat = defaultdict(list)
        for r in recs:
            by_cat[r.category].append(r)
        out = {}
        for c in categories:
            pool = list(by_cat.get(c, []))
            rng.shuffle(pool)
            out[c] = pool[:n]
        return out

    phase1 = take(halves["phase1"], config.phase1_records)
    phase3 = take(halves["phase3"], config.phase3_records)
    if config.label_noise:
        phase1 = {c: with_label_noise(v, config.label_noise, config.seed) for c, v in phase1.items()}
        phase3 = {c: with_label_noise(v, config.label_noise, config.seed) for c, v in phase3.items()}
    return Splits(
        phase1=phase1,
        labels={c: v[: config.label_records] for c, v in phase1.items()},
        phase3=phase3,
        dev=take(top["dev"], config.dev_records),
        test=take(top["test"], config.test_records),
    )


def load_preferences(config: DataConfig, taxonomy) -> list[PreferenceRecord]:
    """Load every preference source and map its labels onto the taxonomy's categories."""
    out: list[PreferenceRecord] = []
    for name in config.sources:
        records = load_data(name, config.data_dir)
        if not records:
            raise ValueError(f"data.sources: {name}: no preference records; is the file empty or blank?")
        out.extend(assign_categories(records, taxonomy))
    return out


def _prompt_inputs(tokenizer, records, max_length: int) -> list[tuple[EncodedInput, str]]:
    return [(encode_prompt(tokenizer, r.conversation, max_length), r.category) for r in records if r.category]


def score_cached(
    model: DMoERM | RewardModel, inputs: Sequence[EncodedInput], cache: TrunkCache, batch_size: int = 16
):
    """Score encoded inputs reading trunk states from ``cache`` (shared by every model on the same trunk).

    Returns (rewards [N], routed category per input or None, capability scores per input)."""
    rewards = torch.empty(len(inputs))
    routed: list[str | None] = [None] * len(inputs)
    capability_scores: list[dict[str, float]] = [{} for _ in inputs]
    bank = model.bank
    memo: dict = {}  # one route per prompt (DMoERM.route)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            states, mask = pad_states(cache.get(bank, chunk))
            if isinstance(model, DMoERM):
                prompt_mask = torch.zeros_like(mask)
                for i, e in enumerate(chunk):
                    prompt_mask[i, : e.prompt_length] = 1
                prompts = [e.input_ids[: e.prompt_length] for e in chunk]
                out = model(states, mask, prompt_mask, model.route(states, prompt_mask, prompts, memo))
                rewards[start : start + len(chunk)] = out.reward
                for i in range(len(chunk)):
                    routed[start + i] = model.categories[int(out.category_index[i])]
                    capability_scores[start + i] = out.capability_scores[i]
            else:
                rewards[start : start + len(chunk)] = bank(states, mask, RewardModel.EXPERT)
    return rewards, routed, capability_scores


def _flat(items: Sequence[RankedItem]) -> tuple[list[EncodedInput], list[slice]]:
    flat, where = [], []
    for item in items:
        where.append(slice(len(flat), len(flat) + len(item.inputs)))
        flat.extend(item.inputs)
    return flat, where


@dataclass
class PipelineResult:
    output_dir: str
    sizes: dict
    table: str
    """Markdown: per-category agreement of DMoERM and the single reward model on the same held-back data."""
    timings: dict
    router: dict
    """The router stage's state (``accuracy``: on the dev prompts, ``per_category``, prompt counts) and
    ``test_routing_accuracy``: the share of test records the router sent to their own category."""
    report: str
    """Path of report.md."""

    def summary(self) -> str:
        """What ``dmoerm train`` prints: the comparison table, the sizes and where the report is."""
        per_cat = ", ".join(f"{c}: {s['phase1']}/{s['phase3']}/{s['test']}" for c, s in self.sizes.items())
        return (
            f"{self.table}\nRecords per category (phase 1 / phase 3 / test): {per_cat}\n"
            f"Router test accuracy {self.router.get('test_routing_accuracy', float('nan')):.3f}. "
            f"Wall time {self.timings.get('total_this_run')} s. Report: {self.report}\n"
        )


def _to_yaml(config: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(asdict(config), sort_keys=False, allow_unicode=True)


def run_pipeline(
    config: PipelineConfig, progress: bool = True, cache: TrunkCache | None = None
) -> PipelineResult:
    """Run (or resume) the whole job; see the module docstring.

    ``cache`` lets several runs on the same backbone share frozen trunk states (experiments comparing label
    sources); None makes one bounded by ``config.trunk_cache_gb``.
    """
    from dmoerm.evaluation import comparison_table, compute_metrics, response_token_lengths, write_eval

    check_instance(config)  # the whole resolved config, typed, before any work
    if not progress:
        hide_library_bars()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = StageState(out / "state.json", config)  # stops here if a finished stage had other inputs
    forget_lost_model_stages(stages, out / "model")
    (out / "config.yaml").write_text(_to_yaml(config), encoding="utf-8")
    tracker = Tracker(config.report_to, out, config=asdict(config))
    timings: dict[str, float] = dict(stages.done.get("_timings", {}))
    t_start = time.perf_counter()

    def timed(stage: str, t0: float) -> None:
        timings[stage] = round(time.perf_counter() - t0, 2)

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
    label_taxonomy = taxonomy  # the judge asks about each record's own category's points
    if config.without_router:
        taxonomy, splits, categories = taxonomy.pooled(POOLED), splits.pooled(POOLED), [POOLED]
    sizes = splits.sizes()
    logger.info("sizes per category (records): %s", json.dumps(sizes))
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2))
    # The exact records of every split, so any other system (an LLM judge: ``dmoerm eval-judge --data
    # runs/main/splits/test.jsonl``) is evaluated on the same held-back pairs.
    for name in ("phase1", "phase3", "dev", "test"):
        save_jsonl(
            [r for recs in getattr(splits, name).values() for r in recs], out / "splits" / f"{name}.jsonl"
        )

    model_dir = out / "model"
    cfg = config.model
    if (model_dir / MODEL_FILE).exists():
        model = load_run_model(model_dir)
        model.routing = config.routing
        logger.info(
            "resuming from %s (finished: %s)",
            model_dir,
            ", ".join(k for k in stages.done if not k.startswith("_")),
        )
    else:
        model = new_dmoerm(cfg, taxonomy, categories, config.routing)
    cache = (
        cache
        if cache is not None
        else TrunkCache(int(config.trunk_cache_gb * (1 << 30)), config.trunk_cache_dir)
    )
    tok, n = model.tokenizer, model.max_length
    items = {
        name: {c: [encode_record(tok, r, n) for r in getattr(splits, name)[c]] for c in categories}
        for name in ("phase1", "phase3", "dev", "test")
    }
    curves = out / "curves"

    def finish(stage: str, t0: float, info: dict | None = None, history: dict | None = None) -> None:
        _save_atomically(model, model_dir)
        timed(stage, t0)
        stages.finish(stage, info)
        stages.finish("_timings", timings)
        tracker.log_stage(stage, info, history)

    # ----------------------------------------------------------------------------------- router
    if "router" not in stages and len(categories) == 1:
        finish(
            "router",
            time.perf_counter(),
            {
                "accuracy": 1.0,
                "per_category": {},
                "train_prompts": 0,
                "dev_prompts": 0,
                "note": "one category: nothing to route",
            },
        )
    if "router" not in stages:
        t0 = time.perf_counter()

        def prompts(sources, limit):
            recs = []
            for s in sources:
                recs.extend(assign_categories(load_data(s, config.data.data_dir), taxonomy))
            recs = [r for r in recs if r.category in categories]
            random.Random(config.data.seed).shuffle(recs)
            return recs[:limit]

        train_prompts = _prompt_inputs(
            tok, prompts(config.data.router_sources, config.data.router_prompts), n
        )
        # The preference records' own prompts are routed by the prompt part of their full inputs (causal
        # attention: identical trunk states), whose trunk states phases 1 and 3 then reuse from the cache.
        train_prompts += [
            (it.inputs[0], c) for name in ("phase1", "phase3") for c in categories for it in items[name][c]
        ]
        dev_prompts = _prompt_inputs(
            tok, prompts(config.data.router_dev_sources, config.data.router_dev_prompts), n
        )
        dev_prompts += [(it.inputs[0], c) for c in categories for it in items["dev"][c]]
        logger.info("router: %d training and %d dev prompts", len(train_prompts), len(dev_prompts))
        result = train_router(model, train_prompts, dev_prompts, config.router, cache, progress=progress)
        save_curves(result.history, curves / "router.png", "router (cross-entropy)")
        finish(
            "router",
            t0,
            {
                "accuracy": result.dev_accuracy,  # the state's key (unchanged) for the dev accuracy
                "per_category": result.per_category,
                "train_prompts": len(train_prompts),
                "dev_prompts": len(dev_prompts),
            },
            history=result.history,
        )

    # ----------------------------------------------------------------------------------- inner models
    labeller = _Labeller(config, label_taxonomy, out / "labels", progress)
    held_out = {
        prompt_key(r.conversation)
        for split in (splits.phase3, splits.dev, splits.test)
        for recs in split.values()
        for r in recs
    }
    members: list[RewardModel] = []
    if config.warm_start == "baseline":
        members = _train_baselines(config, splits, categories, cache, stages, timings, progress, tracker)
        if WARM_START not in model.bank.heads:
            model.bank.import_expert(members[0].bank, RewardModel.EXPERT, WARM_START)
    if config.warm_start == "phase1" and "warm_start" not in stages:
        t0 = time.perf_counter()
        res = train_warm_start(
            model,
            [it for c in categories for it in items["phase1"][c]],
            [it for c in categories for it in items["dev"][c]],
            config.phase1,
            cache,
            checkpoint_dir=out / "checkpoints" / "warm_start",
            progress=progress,
        )
        save_curves(res.history, curves / "warm_start.png", "warm start: every category's phase 1")
        finish(
            "warm_start", t0, {"best_dev_agreement": res.best_dev_agreement, "steps": res.steps}, res.history
        )
    for c in categories:
        stage = f"phase1/{c}"
        if stage not in stages:
            t0 = time.perf_counter()
            res = train_phase1(
                model,
                c,
                items["phase1"][c],
                items["dev"][c],
                config.phase1,
                cache,
                checkpoint_dir=out / "checkpoints" / f"phase1_{c}",
                progress=progress,
                init_from=WARM_START if config.warm_start != "none" else None,
            )
            save_curves(res.history, curves / f"{c}_phase1.png", f"{c}: phase 1")
            finish(stage, t0, {"best_dev_agreement": res.best_dev_agreement, "steps": res.steps}, res.history)

        label_counts: dict[str, int] = {}  # kept labels per capability point, experts or not (the report)
        if config.labels.source != "none":
            stage = f"labels/{c}"
            label_path = out / "labels" / f"{c}.jsonl"
            if stage not in stages:
                t0 = time.perf_counter()
                stats = labeller(splits.labels[c], label_path)
                timed(stage, t0)
                stages.finish(stage, stats)
                stages.finish("_timings", timings)
                tracker.log_stage(stage, stats)
            labels = _read_category_labels(config, label_path, None if config.without_router else c, held_out)
            if config.without_router:  # every category's labels feed the one pooled inner model
                labels = [dataclasses.replace(lab, category=c) for lab in labels]
            plan = plan_category_labels(
                taxonomy if config.labels.human_sources else _judge_only(taxonomy),
                c,
                labels,
                min_labels=config.labels.min_labels,
                held_back_share=config.labels.held_back_share,
                data_dir=config.data.data_dir,
                limit=config.labels.human_limit,
                seed=config.data.seed,
                exclude_prompts=held_out,
            )
            for cap in next(x for x in taxonomy.categories if x.name == c).capabilities:
                label_counts[cap.name] = len(plan.train.get(cap.name, [])) or plan.dropped.get(cap.name, 0)
                if cap.name not in plan.train:
                    logger.warning(
                        "%s/%s: %d kept labels (< %d) from %s: no expert",
                        c,
                        cap.name,
                        plan.dropped.get(cap.name, 0),
                        config.labels.min_labels,
                        plan.sources.get(cap.name),
                    )
                    continue
                stage = f"phase2/{c}/{cap.name}"
                if stage not in stages:
                    t0 = time.perf_counter()
                    res = train_phase2(
                        model,
                        c,
                        cap.name,
                        labels_to_items(plan.train[cap.name], tok, n),
                        [],
                        config.phase2,
                        cache,
                        checkpoint_dir=out / "checkpoints" / f"phase2_{c}_{cap.name}",
                        progress=progress,
                    )
                    held = expert_agreement(
                        model, capability_expert_name(c, cap.name), plan.held_back.get(cap.name, []), cache
                    )
                    info = {"labels": len(plan.train[cap.name]), "source": plan.sources.get(cap.name)}
                    finish(stage, t0, dict(info, steps=res.steps, held_back=held), res.history)

        stage = f"phase3/{c}"
        if stage not in stages:
            t0 = time.perf_counter()
            names = model.category_experts(c) or [rm_expert(c)]
            if names == [rm_expert(c)]:
                logger.warning("%s: no capability experts; phase 3 aggregates the phase-1 model alone", c)
            res = train_phase3(
                model, c, items["phase3"][c], items["dev"][c], config.phase3, cache, experts=names
            )
            save_curves(res.history, curves / f"{c}_phase3.png", f"{c}: phase 3 aggregator")
            info = {"experts": model.aggregator_experts[c], "label_counts": label_counts}
            finish(stage, t0, dict(info, best_dev_agreement=res.best_dev_agreement), res.history)

    # ----------------------------------------------------------------------------------- baseline
    if config.baseline and not members:
        members = _train_baselines(config, splits, categories, cache, stages, timings, progress, tracker)
    baseline = members[0] if members else None

    # ----------------------------------------------------------------------------------- evaluation
    t0 = time.perf_counter()
    test_recs = [r for c in categories for r in splits.test[c]]
    test_items = [it for c in categories for it in items["test"][c]]
    flat, where = _flat(test_items)
    test_tokens = response_token_lengths(tok, test_recs)
    cache.get(model.bank, flat, desc="test trunk" if progress else None)
    # DMoERM, its two scoring-time ablations (issue 5: experts averaged instead of the MLP; the router with
    # each category's phase-1 model alone, i.e. one reward model per category) and the single reward model.
    systems = {"DMoERM": "mlp", "DMoERM, experts averaged": "mean", "per-category RMs (routed)": "phase1"}
    if config.without_router:  # one inner model: its phase-1 model is one RM on phase 1 of every category
        systems = {"DMoERM without router": "mlp", "DMoERM without router, experts averaged": "mean"}
    first = next(iter(systems))
    if baseline is not None:
        systems["single RM"] = baseline
    results = {}
    router_right = 0
    capability_scores: list[dict[str, float]] = []
    for name, system in systems.items():
        t1 = time.perf_counter()
        if system == "mean" and config.routing.mode == "top1":
            # The experts' mean is the mean of the capability scores the DMoERM pass already returned (same
            # routing, same experts): no second pass through the experts.
            rewards = torch.tensor([sum(c.values()) / len(c) for c in capability_scores])
        else:
            if isinstance(system, str):
                model.routing = dataclasses.replace(config.routing, aggregation=system)
                system = model
            rewards, routed, scores = score_cached(system, flat, cache)
            if name == first:
                capability_scores = scores
                router_right = sum(routed[w.start] == r.category for w, r in zip(where, test_recs))
        seconds = time.perf_counter() - t1
        per_record = [rewards[w].tolist() for w in where]
        result = compute_metrics(per_record, test_recs, token_lengths=test_tokens, system=name)
        write_eval(result, out / "eval" / eval_folder(name))
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
            _evaluate_ensemble(members, flat, where, test_recs, test_tokens, items["dev"], cache, out)
        )
    timed("eval", t0)
    timings["total_this_run"] = round(time.perf_counter() - t_start, 2)
    stages.finish("_timings", timings)
    stages.finish(
        "eval", {"router_test_accuracy": router_right / max(1, len(test_recs)), "systems": list(results)}
    )
    tracker.log_results(results, router_test_accuracy=stages.done["eval"]["router_test_accuracy"])
    tracker.close()
    report = write_report(out)
    table = comparison_table(results, systems_as="columns")
    router_info = dict(
        stages.done.get("router", {}), test_routing_accuracy=stages.done["eval"]["router_test_accuracy"]
    )
    return PipelineResult(str(out), sizes, table, timings, router_info, str(report))


def _train_baselines(
    config, splits, categories, cache, stages, timings, progress, tracker
) -> list[RewardModel]:
    """The single reward model on phase 1 + phase 3 of every category (and, with ``ensemble_size``, its
    seeded siblings); finished ones are loaded. Returns the members, the baseline first."""
    out = Path(config.output_dir)
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
            out / name,
            cache=cache,
            progress=progress,
        )
        members.append(member)
        if name not in stages:
            timings[name] = round(time.perf_counter() - t0, 2)
            stages.finish(name, {"train_records": len(train_recs)})
            stages.finish("_timings", timings)
            if res is not None:  # None: trained by a run that stopped before recording it
                tracker.log_stage(name, {"best_dev_agreement": res.best_dev_agreement}, res.history)
    return members


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
        on_dev, _, _ = score_cached(member, dev, cache)
        on_inputs, _, _ = score_cached(member, inputs, cache)
        scores.append((on_inputs - on_dev.mean()) / on_dev.std().clamp(min=1e-6))
    return torch.stack(scores)


def _evaluate_ensemble(members, flat, where, test_recs, test_tokens, dev_items, cache, out: Path) -> dict:
    """Mean, worst-case and uncertainty-weighted ensembles of single reward models on the test inputs.

    Each member's rewards are standardised with its mean and std on the dev inputs first, so the worst case
    and the variance compare like with like (Coste et al. 2023 normalise their members the same way).
    """
    from dmoerm.evaluation import ENSEMBLE_RULES, combine_rewards, compute_metrics, write_eval

    dev_flat, _ = _flat([it for items in dev_items.values() for it in items])
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


_SYSTEM_ORDER = ("DMoERM", "DMoERM, experts averaged", "per-category RMs (routed)", "single RM")


def eval_folder(system: str) -> str:
    """eval/<folder> of a system name: ``DMoERM, experts averaged`` -> ``DMoERM_experts_averaged``."""
    return "_".join("".join(ch if ch.isalnum() else " " for ch in system).split())


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` of a run from what it saved (config, sizes, state, eval/*/eval.json, curves).

    Every evaluation under ``eval/`` is a column of the comparison table, so baselines evaluated later with
    ``dmoerm eval --out <run>/eval/<name>`` join the report when it is rewritten.
    """
    import yaml

    from dmoerm.evaluation import comparison_table, length_table, load_eval

    run = Path(run_dir)
    if not (run / "state.json").exists():
        raise FileNotFoundError(f"{run}: no state.json; is this the output_dir of a `dmoerm train` run?")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    sizes = json.loads((run / "sizes.json").read_text())
    done = json.loads((run / "state.json").read_text())
    timings = done.get("_timings", {})
    found = {}
    for p in sorted(run.glob("eval/*/eval.json")):
        result = load_eval(p)
        found[result.system or p.parent.name] = result
    order = [n for n in _SYSTEM_ORDER if n in found] + [n for n in found if n not in _SYSTEM_ORDER]
    results = {n: found[n] for n in order}
    model = config.get("model", {})
    lines = [
        "# dmoerm run report",
        "",
        f"Backbone `{model.get('backbone')}`, top layers trained {model.get('num_top_layers')}, "
        f"max length {model.get('max_length')} tokens, capability labels from "
        f"`{config.get('labels', {}).get('source')}`.",
        "",
        "## Agreement with human preferences on held-back test data (%)",
        "",
        "Pairwise agreement per category; the overall cell has its bootstrap 95% interval; n = untied pairs.",
        "",
        comparison_table(results, systems_as="columns") if results else "(no evaluation yet)\n",
    ]
    if results:
        lines += [
            "Length controls (issue 8): the longer-wins rule on the same pairs, agreement on the pairs where the"
            " shorter / the longer response is the better one, and the reward's correlation with length.",
            "",
            length_table(results),
        ]
    router, ev = done.get("router", {}), done.get("eval", {})
    if router:
        lines.append(
            f"Router: accuracy {router.get('accuracy', float('nan')):.3f} on {router.get('dev_prompts')} dev "
            f"prompts; sends {ev.get('router_test_accuracy', float('nan')):.3f} of test records to their "
            "labelled category."
        )
    lines += [
        "",
        "## Per category: sizes (records) and dev agreement per phase",
        "",
        "| category | phase 1 | labelled | phase 3 | dev | test | phase-1 dev | labels kept/asked | experts (kept labels) | phase-3 dev |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c, n in sizes.items():
        p1, p3, lab = done.get(f"phase1/{c}", {}), done.get(f"phase3/{c}", {}), done.get(f"labels/{c}", {})
        kept = f"{lab['kept']}/{lab['questions']}" if "kept" in lab and "questions" in lab else "-"
        if lab.get("degraded"):  # the user allowed failed judge questions (labels.max_failed_share)
            kept += f" (degraded: {lab.get('failed')} failed)"
        counts = p3.get("label_counts", {})
        names = [e.split("__", 1)[-1] for e in p3.get("experts", [])]
        experts = ", ".join(n + (f" ({counts[n]})" if n in counts else "") for n in names) or "-"
        dropped = [f"{k} ({v})" for k, v in counts.items() if k not in names]
        if dropped:
            experts += "; too few labels: " + ", ".join(dropped)
        lines.append(
            f"| {c} | {n['phase1']} | {n['labels']} | {n['phase3']} | {n['dev']} | {n['test']} | "
            f"{_fmt(p1.get('best_dev_agreement'))} | {kept} | {experts} | {_fmt(p3.get('best_dev_agreement'))} |"
        )
    lines += _expert_lines(done)
    lines += ["", "## Wall time (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    curves = sorted(run.glob("curves/*.png"))
    if curves:
        lines += ["", "## Curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(run).as_posix()})" for p in curves]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _judge_only(taxonomy):
    """The taxonomy with every capability point's label source set to the judge."""
    cats = tuple(
        dataclasses.replace(
            c, capabilities=tuple(dataclasses.replace(p, label_source="judge") for p in c.capabilities)
        )
        for c in taxonomy.categories
    )
    return dataclasses.replace(taxonomy, categories=cats)


def _expert_lines(done: dict) -> list[str]:
    """The capability experts that exist: label source, training labels, agreement with held-back labels."""
    rows = []
    for stage, info in done.items():
        if stage.startswith("phase2/"):
            _, c, cap = stage.split("/", 2)
            held = info.get("held_back") or {}
            agree = held.get("agreement")
            rows.append(
                f"| {c} | {cap} | {info.get('source', 'judge')} | {info.get('labels')} | "
                f"{'-' if agree is None else f'{100 * agree:.1f}'} | {held.get('n', 0)} |"
            )
    if not rows:
        return ["", "No capability expert was trained (no capability point had enough kept labels)."]
    return [
        "",
        "## Capability experts",
        "",
        "| category | capability | label source | training labels | held-back agreement (%) | held-back labels |",
        "|---|---|---|---:|---:|---:|",
        *rows,
    ]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


class _Labeller:
    """The run's LLM judge, built on first use and shared by every category (one model load, one SQLite
    cache in ``labels/``: a rerun asks nothing twice)."""

    def __init__(self, config: PipelineConfig, taxonomy, folder: Path, progress: bool):
        self.config, self.taxonomy, self.folder, self.progress = config, taxonomy, folder, progress
        self.judge = None

    def __call__(self, records: Sequence[PreferenceRecord], path: Path) -> dict:
        """Judge the records' pairs per capability point of their category into ``path``; the stats."""
        if self.config.labels.source == "file":
            return {"source": self.config.labels.file}
        from dmoerm.labelling.pipeline import label_pairs, make_judge

        backend = "openai" if self.config.labels.source == "openai" else "local"
        self.judge_config = judge_label_config(
            self.config.labels, str(path), str(self.folder / "judge.cache.sqlite")
        )
        if backend == "local" and self.judge_config.model is None:
            backbone = self.config.model.backbone
            self.judge_config.model = None if backbone == "default" else backbone
        if self.judge is None:
            self.judge = make_judge(self.judge_config)
        stats = label_pairs(
            list(records),
            self.taxonomy,
            self.judge,
            path,
            consistency=self.judge_config.consistency,
            min_margin=self.judge_config.min_margin,
            language=self.judge_config.language,
            max_pairs_per_record=1,
            progress=self.progress,
        )
        return self._check_failures(stats.to_dict(), path)

    def _check_failures(self, stats: dict, path: Path) -> dict:
        """Stop the run when more of the questions failed than ``labels.max_failed_share`` allows; mark the
        stats ``degraded`` when some failed within it (a failed question is never cached: a rerun asks it)."""
        failed, questions = stats.get("failed", 0), stats.get("questions", 0)
        if not failed:
            return stats
        allowed = self.config.labels.max_failed_share
        where = self.judge_config.base_url if self.judge_config.backend == "openai" else "the local judge"
        if failed > allowed * questions:
            raise RunStopped(
                f"labels/{path.stem}: {failed} of {questions} judge questions failed after their retries "
                f"(judge at {where}); labelling is not marked finished. Rerun when the judge is back: only the "
                f"failed questions are asked again (answers are cached in {self.folder / 'judge.cache.sqlite'}). "
                f"To go on without them, set labels.max_failed_share (now {allowed}) to at least "
                f"{failed / questions:.2f}."
            )
        logger.warning(
            "%s: %d of %d judge questions failed (judge at %s); going on degraded as labels.max_failed_share "
            "= %s allows",
            path.stem,
            failed,
            questions,
            where,
            allowed,
        )
        return dict(stats, degraded=True)


def _read_category_labels(config: PipelineConfig, path: Path, category: str | None, held_out: set[tuple]):
    """The category's labels (every label when ``category`` is None), minus any on a prompt that phase 3, dev
    or test use.

    A label file given by the user may cover prompts this run holds out; training an expert on them would
    leak into phase 3 and the evaluation (the paper keeps the phases' data disjoint), so they are dropped.
    """
    from dmoerm.labelling.schema import read_labels

    source = Path(config.labels.file) if config.labels.source == "file" else path
    if not source.exists():
        return []
    labels = [lab for lab in read_labels(source) if category is None or lab.category in (category, None)]
    kept = [lab for lab in labels if prompt_key(lab.conversation) not in held_out]
    if len(kept) < len(labels):
        logger.info(
            "%s: dropped %d of %d labels whose prompt is held out for phase 3, dev or test",
            category,
            len(labels) - len(kept),
            len(labels),
        )
    return kept


def prompt_key(conversation) -> tuple:
    return tuple((m.role, m.content) for m in conversation)
