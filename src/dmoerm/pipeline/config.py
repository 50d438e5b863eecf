"""The job's configs: what data feeds which phase (:class:`DataConfig`), where capability labels come from
(:class:`LabelsConfig`) and the whole run (:class:`PipelineConfig`), read from YAML/JSON with overrides and
typed by :mod:`dmoerm.config_check` so a bad value names its field before any work."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmoerm.experts import BackboneConfig
from dmoerm.model import RoutingConfig
from dmoerm.tracking import check_report_to
from dmoerm.training.loop import TrainConfig
from dmoerm.training.phases import AggregatorTrainConfig, RouterTrainConfig


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
    test_share: float = 0.1
    """Share of the prompts held back for test (``test_records`` per category are drawn from them). A larger
    share gives the small categories more test pairs; a prompt in the test share at 0.1 stays in it at any
    larger share (the test prompts are nested)."""
    dev_share: float = 0.1
    """Share of the prompts held back for dev; the rest (at least 0.2) is split by prompt into phase 1 and
    phase 3."""
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
        if not 0.0 < self.test_share < 1.0 or not 0.0 <= self.dev_share < 1.0:
            raise ValueError(
                f"test_share, dev_share: {self.test_share}, {self.dev_share}; test_share must be in (0, 1) and "
                "dev_share in [0, 1)"
            )
        if self.test_share + self.dev_share > 0.8:
            raise ValueError(
                f"test_share + dev_share: {self.test_share + self.dev_share:g} leaves under 0.2 of the prompts "
                "for phase 1 and phase 3; use at most 0.8 together"
            )


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
            judge_label_config(self, "judge.cache.sqlite")  # judge options checked now


_JUDGE_SET_BY_PIPELINE = ("backend", "data", "out", "taxonomy", "limit", "default_category", "capabilities")


def judge_label_config(labels: LabelsConfig, cache: str, backbone: str | None = None):
    """The :class:`~dmoerm.labelling.pipeline.LabelJudgeConfig` of the run's judge, every option of
    ``labels.judge`` typed and checked (errors name ``judge.<field>``). A local judge without a ``model`` is the
    run's ``backbone`` (None or ``default``: the bundled one)."""
    from dmoerm.config_check import ConfigError, build
    from dmoerm.labelling.pipeline import LabelJudgeConfig

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
    obj = {"cache": cache, "consistency": "strict", **judge, "backend": backend}
    if backend == "local" and obj.get("model") is None and backbone != "default":
        obj["model"] = backbone
    return build(LabelJudgeConfig, obj, "judge")


WARM_STARTS = ("none", "phase1", "baseline")


@dataclass
class SpecialiseConfig:
    """How each category's inner model specialises from the pooled start (issue 13: specialising the single
    RM on one category's records loses more than it gains). The defaults specialise as before."""

    replay: float = 0.0
    """Rehearsal: each category's phase 1 also trains on ``replay`` times as many phase-1 records of the
    other categories as it has of its own (drawn with ``data.seed``; 0 for none, 1 for as many), so the
    inner model keeps what the pooled model knows while it specialises."""
    learning_rate: float | None = None
    """Phase 1's learning rate when warm-started (None: ``phase1.learning_rate``, which the single RM
    uses too); a smaller step keeps the specialised model near its pooled start. With ``warm_start: none``
    phase 1 has no start to stay near and uses ``phase1.learning_rate`` (so ``--set warm_start=none`` on
    the main job is its cold-start ablation as it stands)."""
    shared_expert: bool = False
    """The pooled start (expert ``warmstart__rm``) joins every category's aggregator as an expert shared
    by all categories (as DeepSeekMoE's shared experts), beside the category's own. Needs a warm start."""
    gate_alpha: float = 1.0
    """How sure dev must be before a warm-started phase 1 keeps its specialisation: over the dev pairs the
    specialised model ranks differently from its start, those it turns right must outnumber those it turns
    wrong at this level of a one-sided sign test, else the model goes back to exactly its start (state.json
    ``phase1/<category>.gate``). 1.0 keeps it whenever its dev agreement is higher (the rule before this
    field); ``phase3.gate_alpha`` is the same gate for the aggregator's correction."""
    gate_share: float = 0.0
    """Share of each category's dev records that both gates (``gate_alpha`` here, ``phase3.gate_alpha``) read
    alone, while phase 1's and phase 3's early stopping read the rest: the sign test then sees records that
    did not pick the best epoch (with one dev set for both, the best of many epochs wins its dev pairs by
    chance and passes the test more often than ``gate_alpha`` says; measured in docs/levers.md). 0: both read
    every dev record (the rule before this field). The pooled model, the single RM and an ungated phase read
    every dev record."""
    gate_cross_fit: bool = False
    """Both gates read every dev record and still test none on the epoch it helped pick: each half of a
    category's dev picks its own best evaluation (as early stopping would, reading that half alone), the pick
    is tested against the start on the other half, and the halves' counts are summed into one sign test
    (:func:`dmoerm.training.gates.cross_fit_gate`). What is kept is early stopping's pick on all of dev, so
    the gate tests the rule that picked it, not that one model; training runs on until each half's patience
    has run out too. Needs ``gate_share`` 0. False: the rule ``gate_share`` sets."""

    def __post_init__(self) -> None:
        if isinstance(self.replay, bool) or not 0.0 <= self.replay <= 100.0:
            raise ValueError(f"replay: must be a number in [0, 100], got {self.replay!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0 or null, got {self.learning_rate!r}")
        if isinstance(self.gate_alpha, bool) or not 0.0 < self.gate_alpha <= 1.0:
            raise ValueError(f"gate_alpha: must be in (0, 1], got {self.gate_alpha!r}")
        if isinstance(self.gate_share, bool) or not 0.0 <= self.gate_share < 1.0:
            raise ValueError(f"gate_share: must be a share in [0, 1), got {self.gate_share!r}")
        if not isinstance(self.gate_cross_fit, bool):
            raise ValueError(f"gate_cross_fit: must be true or false, got {self.gate_cross_fit!r}")
        if self.gate_cross_fit and self.gate_share > 0:
            raise ValueError(
                f"gate_cross_fit: cross-fitting splits dev itself, so gate_share must be 0, got {self.gate_share!r}"
            )


LIKELIHOOD_FITS = ("none", "global", "category")


@dataclass
class LikelihoodConfig:
    """The backbone's own likelihood of a response as a term of DMoERM's reward (:mod:`dmoerm.likelihood`;
    docs/likelihood.md). Off by default: the model then scores exactly as without it."""

    fit: str = "none"
    """``none``: no term. ``global``: one weight for every category, fitted on every category's dev records
    after phase 3 (stage ``likelihood``). ``category``: a weight per category, fitted on the dev pairs routed
    to it. The fit maximises the dev pairs' Bradley-Terry likelihood of reward + weight * likelihood, with
    the model's own dev rewards as offset; dev is the only human ranking none of DMoERM's models trained on."""
    max_weight: float = 10.0
    """Bound on each weight's size (dev pairs the term alone separates would send the fit to infinity)."""

    def __post_init__(self) -> None:
        if self.fit not in LIKELIHOOD_FITS:
            raise ValueError(f"fit: {self.fit!r} is not one of {', '.join(LIKELIHOOD_FITS)}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, (int, float)):
            raise ValueError(f"max_weight: must be a number > 0, got {self.max_weight!r}")
        if not 0 < self.max_weight < float("inf"):
            raise ValueError(f"max_weight: must be a finite number > 0, got {self.max_weight!r}")


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
    specialise: SpecialiseConfig = field(default_factory=SpecialiseConfig)
    """How a warm-started inner model specialises on its category: rehearsal, step size, a shared expert."""
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    """The backbone's likelihood of a response as a term of DMoERM's reward, fitted on dev after phase 3."""
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
        if self.warm_start == "none" and self.specialise.shared_expert:
            raise ValueError(
                "specialise.shared_expert: true needs a pooled start to share; set warm_start to phase1 or baseline"
            )
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


def config_yaml(config: PipelineConfig) -> str:
    """The resolved config as ``config.yaml`` holds it."""
    import yaml

    return yaml.safe_dump(asdict(config), sort_keys=False, allow_unicode=True)
