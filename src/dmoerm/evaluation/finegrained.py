"""The fine-grained expert experiment (``dmoerm finegrained``): does phase 2 help when its capability labels are
good?

The paper's phase 2 rests on a strong LLM judge; offline only a weak one is at hand, so a DMoERM trained here can
fail for two reasons, the method or the labels. FineGrainedRLHF's QA feedback (Wu et al. 2023) carries real human
per-aspect judgements beside overall preferences, so on its data the same inner model is trained twice, with
experts on the human aspect labels and on the local judge's labels of the very same pairs, beside the single
reward model, and all three are scored against held-back human overall preferences.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from dmoerm.data import conversation_key
from dmoerm.evaluation.results import load_eval
from dmoerm.labelling.schema import CapabilityLabel, read_labels, write_labels
from dmoerm.pipeline import (
    PipelineConfig,
    build_splits,
    load_preferences,
    run_pipeline,
)
from dmoerm.taxonomy import load_taxonomy
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)

FINEGRAINED_SOURCE = "finegrained_rlhf/qa_dev"
CATEGORY = "long_form_qa"


@dataclass
class FineGrainedConfig:
    """``dmoerm finegrained``: phase 2 on human aspect labels vs the local judge's labels (same pairs)."""

    output_dir: str = "runs/finegrained"
    """Where both runs, the label files, results.json and report.md go (a rerun resumes)."""
    backbone: str = "default"
    """Backbone of every model (and of the local judge): ``default`` (bundled SmolLM2), a hub id or a folder."""
    max_length: int = 384
    """Token limit of one (question + passages, answer) input; the conversation is cut from the left."""
    num_top_layers: int = 2
    """Top layers that carry LoRA; the rest is a frozen, cached trunk."""
    phase1_records: int = 60
    """Questions for phase 1; the capability labels come from these questions only."""
    phase3_records: int = 60
    """Questions for phase 3 (disjoint from phase 1)."""
    dev_records: int = 16
    """Questions for early stopping."""
    test_records: int = 50
    """Held-back questions: overall-preference agreement and each expert's agreement with its aspect labels."""
    epochs: int = 3
    """Epochs of phase 1, the single reward model and each expert."""
    judge: str = "local"
    """``local``: also train on the local judge's labels of the same pairs; ``none``: human labels only."""
    judge_batch_size: int = 8
    """Local judge: rows per forward pass."""
    judge_max_length: int = 1024
    """Local judge: prompt tokens at most (the passages are cut in the middle beyond it)."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    seed: int = 0
    """Seed of the splits and training."""
    trunk_cache_gb: float = 6.0
    """Memory bound of the trunk-state cache shared by every model of the experiment."""

    def __post_init__(self) -> None:
        for name in ("phase1_records", "phase3_records", "test_records", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.judge not in ("local", "none"):
            raise ValueError(f"judge: {self.judge!r} is not one of local, none")

    def pipeline(self, name: str, labels_file: Path, baseline: bool) -> PipelineConfig:
        """The pipeline run of one label source (same data, splits, backbone and budget for every run)."""
        fast = {"epochs": self.epochs, "learning_rate": 1e-3, "batch_size": 8, "seed": self.seed}
        return PipelineConfig.from_dict(
            {
                "output_dir": str(Path(self.output_dir) / name),
                "model": {
                    "backbone": self.backbone,
                    "num_top_layers": self.num_top_layers,
                    "max_length": self.max_length,
                },
                "data": {
                    "sources": [FINEGRAINED_SOURCE],
                    "router_sources": [],
                    "router_dev_sources": [],
                    "taxonomy": "finegrained",
                    "phase1_records": self.phase1_records,
                    "label_records": self.phase1_records,
                    "phase3_records": self.phase3_records,
                    "dev_records": self.dev_records,
                    "test_records": self.test_records,
                    "data_dir": self.data_dir,
                    "seed": self.seed,
                },
                "labels": {"source": "file", "file": str(labels_file), "min_labels": 2},
                "router": {"epochs": 1},
                "phase1": fast,
                "phase2": dict(fast, learning_rate=5e-4, early_stopping_patience=0),
                "phase3": {"seed": self.seed},
                "baseline": baseline,
                "trunk_cache_gb": self.trunk_cache_gb,
            }
        )


def expert_agreement(model, labels: list[CapabilityLabel], cache: TrunkCache) -> dict[str, dict]:
    """Each capability expert's agreement with held-back aspect labels (ties excluded): does its own score
    rank the pair as the humans did on that aspect? Per capability point with an expert, scored by
    :func:`dmoerm.labelling.human.expert_agreement`."""
    from dmoerm.labelling.human import expert_agreement as one_expert_agreement
    from dmoerm.model import capability_expert_name

    by_cap: dict[str, list[CapabilityLabel]] = {}
    for lab in labels:
        by_cap.setdefault(lab.capability, []).append(lab)
    out: dict[str, dict] = {}
    for cap in sorted(by_cap):
        name = capability_expert_name(CATEGORY, cap)
        if name in model.bank.heads:
            out[cap] = one_expert_agreement(model, name, by_cap[cap], cache)
    return out


def judge_vs_human(judge: list[CapabilityLabel], human: list[CapabilityLabel]) -> dict[str, dict]:
    """Per aspect: how many human labels the judge kept a label for, and how often they agree."""
    verdict = {
        (conversation_key(j.conversation), j.response_a, j.response_b, j.capability): j.winner for j in judge
    }
    out: dict[str, dict] = {}
    for h in human:
        row = out.setdefault(h.capability, {"human": 0, "kept": 0, "agree": 0})
        row["human"] += 1
        w = verdict.get((conversation_key(h.conversation), h.response_a, h.response_b, h.capability))
        if w in ("a", "b"):
            row["kept"] += 1
            row["agree"] += w == h.winner
    for row in out.values():
        row["agreement"] = row["agree"] / row["kept"] if row["kept"] else None
    return out


def _judge_labels(config: FineGrainedConfig, taxonomy, human: list[CapabilityLabel], out: Path) -> Path:
    """The local judge's labels of exactly the human-labelled (pair, aspect)s, both orders, cached."""
    from dmoerm.labelling.config import make_judge
    from dmoerm.labelling.pairs import LabelPair
    from dmoerm.labelling.pipeline import LabelConfig, label_pairs

    path = out / "labels_judge.jsonl"
    raw = out / "labels_judge_all.jsonl"
    pairs = list(
        {
            (h.conversation, h.response_a, h.response_b): LabelPair(
                h.conversation, h.response_a, h.response_b, category=CATEGORY
            )
            for h in human
        }.values()
    )
    cfg = LabelConfig(
        data=[FINEGRAINED_SOURCE],
        out=str(raw),
        backend="local",
        model=None if config.backbone == "default" else config.backbone,
        batch_size=config.judge_batch_size,
        max_length=config.judge_max_length,
    )
    label_pairs(pairs, taxonomy, make_judge(cfg), raw, consistency=cfg.consistency, progress=True)
    asked = {(conversation_key(h.conversation), h.response_a, h.response_b, h.capability) for h in human}
    kept = [
        j
        for j in read_labels(raw)
        if (conversation_key(j.conversation), j.response_a, j.response_b, j.capability) in asked
    ]
    write_labels(kept, path)
    return path


def run_finegrained(config: FineGrainedConfig, progress: bool = True) -> dict:
    """Run (or resume) the experiment; write ``results.json`` and ``report.md``; return the results."""
    from dmoerm.labelling.aspects import finegrained_aspect_labels

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = load_taxonomy("finegrained")
    human_path = out / "labels_human.jsonl"
    reference = config.pipeline("human", human_path, baseline=True)
    records = [r for r in load_preferences(reference.data, taxonomy) if r.category == CATEGORY]
    splits = build_splits(records, [CATEGORY], reference.data)
    labelled = {conversation_key(r.conversation) for r in splits.to_label[CATEGORY]}
    tested = {conversation_key(r.conversation) for r in splits.test[CATEGORY]}
    aspects = finegrained_aspect_labels(records)
    train_labels = [lab for lab in aspects if conversation_key(lab.conversation) in labelled]
    test_labels = [lab for lab in aspects if conversation_key(lab.conversation) in tested]
    write_labels(train_labels, human_path)
    logger.info(
        "finegrained: %d human aspect labels on %d phase-1 questions, %d on %d test questions",
        len(train_labels),
        len(labelled),
        len(test_labels),
        len(tested),
    )
    cache = TrunkCache(int(config.trunk_cache_gb * (1 << 30)))
    runs = {"human": run_pipeline(reference, progress, cache)}
    judge_stats = None
    if config.judge == "local":
        judge_path = _judge_labels(config, taxonomy, train_labels, out)
        judge_stats = judge_vs_human(read_labels(judge_path), train_labels)
        runs["judge"] = run_pipeline(config.pipeline("judge", judge_path, baseline=False), progress, cache)

    from dmoerm.model import DMoERM

    results: dict = {"config": asdict(config), "sizes": runs["human"].sizes, "systems": {}}
    base = load_eval(out / "human" / "eval" / "single_RM" / "eval.json").overall.agreement
    results["systems"]["single RM (overall preferences)"] = {"agreement": asdict(base)}
    for name, label in (("human", "human aspect labels"), ("judge", "local judge labels")):
        if name not in runs:
            continue
        ev = load_eval(out / name / "eval" / "DMoERM" / "eval.json").overall.agreement
        model = DMoERM.from_pretrained(out / name / "model")
        results["systems"][f"DMoERM, experts on {label}"] = {
            "agreement": asdict(ev),
            "labels": len(read_labels(human_path if name == "human" else out / "labels_judge.jsonl")),
            "experts": expert_agreement(model, test_labels, cache),
        }
    results["judge_vs_human"] = judge_stats
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "report.md").write_text(finegrained_markdown(results), encoding="utf-8")
    logger.info("wrote %s", out / "report.md")
    return results


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def finegrained_markdown(results: dict) -> str:
    """The experiment's tables as Markdown."""
    caps = ("relevance", "factuality", "completeness")
    lines = [
        "| system | labels | agreement with held-back human preferences (95% CI) | pairs | "
        + " | ".join(f"{c} expert" for c in caps)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(caps),
    ]
    for name, row in results["systems"].items():
        a = row["agreement"]
        experts = row.get("experts", {})
        cells = [
            f"{_pct(experts[c]['agreement'])} (n={experts[c]['n']})" if c in experts else "-" for c in caps
        ]
        lines.append(
            f"| {name} | {row.get('labels', '-')} | {_pct(a['value'])} [{_pct(a['ci_low'])}, {_pct(a['ci_high'])}] "
            f"| {a['n']} | " + " | ".join(cells) + " |"
        )
    judge = results.get("judge_vs_human")
    if judge:
        lines += [
            "",
            "Local judge vs human aspect labels on the phase-1 pairs (both orders asked; a label is kept by the"
            " judge's consistency rule, `auto`: the logit-margin difference across the two orders):",
            "",
            "| aspect | human labels | judge kept | agreement of kept |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {c} | {r['human']} | {r['kept']} | {_pct(r['agreement'])} |" for c, r in sorted(judge.items())
        ]
    return "\n".join(lines) + "\n"
