"""Experiments beyond the main job.

``run_finegrained`` (``dmoerm finegrained``): does phase 2 help when its capability labels are good? The paper's
phase 2 rests on a strong LLM judge; offline only a weak one is at hand, so a DMoERM trained here can fail for
two reasons, the method or the labels. FineGrainedRLHF's QA feedback (Wu et al. 2023) carries real human
per-aspect judgements beside overall preferences, so on its data the same inner model is trained twice, with
experts on the human aspect labels and on the local judge's labels of the very same pairs, beside the single
reward model, and all three are scored against held-back human overall preferences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from dmoerm.encoding import encode, encode_record
from dmoerm.labelling.schema import CapabilityLabel, read_labels, write_labels
from dmoerm.pipeline import (
    PipelineConfig,
    build_splits,
    load_preferences,
    prompt_key,
    run_pipeline,
    score_cached,
)
from dmoerm.taxonomy import load_taxonomy
from dmoerm.training.loop import TrunkCache

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
        (prompt_key(j.conversation), j.response_a, j.response_b, j.capability): j.winner for j in judge
    }
    out: dict[str, dict] = {}
    for h in human:
        row = out.setdefault(h.capability, {"human": 0, "kept": 0, "agree": 0})
        row["human"] += 1
        w = verdict.get((prompt_key(h.conversation), h.response_a, h.response_b, h.capability))
        if w in ("a", "b"):
            row["kept"] += 1
            row["agree"] += w == h.winner
    for row in out.values():
        row["agreement"] = row["agree"] / row["kept"] if row["kept"] else None
    return out


def _judge_labels(config: FineGrainedConfig, taxonomy, human: list[CapabilityLabel], out: Path) -> Path:
    """The local judge's labels of exactly the human-labelled (pair, aspect)s, both orders, cached."""
    from dmoerm.labelling.pipeline import LabelConfig, LabelPair, label_pairs, make_judge

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
    asked = {(prompt_key(h.conversation), h.response_a, h.response_b, h.capability) for h in human}
    kept = [
        j
        for j in read_labels(raw)
        if (prompt_key(j.conversation), j.response_a, j.response_b, j.capability) in asked
    ]
    write_labels(kept, path)
    return path


def run_finegrained(config: FineGrainedConfig, progress: bool = True) -> dict:
    """Run (or resume) the experiment; write ``results.json`` and ``report.md``; return the results."""
    from dmoerm.evaluation import load_eval
    from dmoerm.labelling.quality import finegrained_aspect_labels

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = load_taxonomy("finegrained")
    human_path = out / "labels_human.jsonl"
    reference = config.pipeline("human", human_path, baseline=True)
    records = [r for r in load_preferences(reference.data, taxonomy) if r.category == CATEGORY]
    splits = build_splits(records, [CATEGORY], reference.data)
    labelled = {prompt_key(r.conversation) for r in splits.labels[CATEGORY]}
    tested = {prompt_key(r.conversation) for r in splits.test[CATEGORY]}
    aspects = finegrained_aspect_labels(records)
    train_labels = [lab for lab in aspects if prompt_key(lab.conversation) in labelled]
    test_labels = [lab for lab in aspects if prompt_key(lab.conversation) in tested]
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


# --------------------------------------------------------------------------------------------------------------
# Best-of-n over-optimisation (issue 5; Gao et al. 2022, Coste et al. 2023)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class OverOptConfig:
    """``dmoerm overopt``: best-of-n by noisy proxy reward models, judged by a gold reward model.

    The proxies (DMoERM, the single reward model, and the ensembles of ``ensemble_size`` seeded single models
    under the mean, worst-case and uncertainty-weighted rules) are the pipeline of ``pipeline`` trained with
    ``label_noise`` of their human rankings reversed. The gold model is a single reward model trained on the
    proxies' rankings with clean labels plus ``gold_extra_records`` more per category, for ``gold_epochs``. The
    generator samples ``n_max`` responses to held-back test prompts; each proxy picks the best of n, and the gold
    reward and the length of its pick are plotted against KL = log n - (n - 1) / n.
    """

    output_dir: str = "runs/overopt"
    """Where the proxies, the gold model, the samples, results.json, report.md and the plots go (a rerun
    resumes)."""
    pipeline: str = "configs/main.yaml"
    """Pipeline config of the proxies (data, sizes, backbone, budgets); its output_dir is replaced."""
    label_noise: float = 0.25
    """Share of the proxies' phase-1 and phase-3 human rankings reversed (Coste et al. 2023: 25%)."""
    ensemble_size: int = 3
    """Seeded single reward models in the ensemble proxies (mean, min, uwo); 0 or 1 for none."""
    gold_extra_records: int = 24
    """Records per category the gold model trains on beyond the proxies' phase-1 and phase-3 records."""
    gold_epochs: int = 4
    """Epochs of the gold model."""
    prompts_per_category: int = 2
    """Held-back test prompts per category to sample for (the first ones that fit ``max_prompt_tokens``)."""
    max_prompt_tokens: int = 160
    """Longer prompts are skipped (sampling cost grows with them)."""
    n_max: int = 16
    """Samples per prompt; best-of-n is estimated for n = 1, 2, 4, ... n_max without bias (Gao et al.)."""
    max_new_tokens: int = 96
    """Tokens per sample at most."""
    temperature: float = 1.0
    """Sampling temperature (pure sampling otherwise)."""
    generator: str = "default"
    """Generator: ``default`` (bundled SmolLM2-135M-Instruct), a hub id or a folder."""
    seed: int = 0
    """Seed of sampling."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise: {self.label_noise} must be in [0, 0.5); Coste et al. use 0.25")
        for name in ("gold_epochs", "prompts_per_category", "max_prompt_tokens", "n_max", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.gold_extra_records < 0:
            raise ValueError(f"gold_extra_records: must be >= 0, got {self.gold_extra_records}")
        if self.ensemble_size < 0:
            raise ValueError(f"ensemble_size: must be >= 0, got {self.ensemble_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")

    def proxies(self) -> PipelineConfig:
        """The proxies' pipeline config: ``pipeline`` with the noise, the ensemble and this output folder."""
        base = PipelineConfig.from_file(self.pipeline)
        return dataclasses.replace(
            base,
            output_dir=str(Path(self.output_dir) / "proxies"),
            data=dataclasses.replace(base.data, label_noise=self.label_noise),
            baseline=True,
            ensemble_size=self.ensemble_size,
        )


def run_overopt(config: OverOptConfig, progress: bool = True) -> dict:
    """Run (or resume) the experiment; write ``results.json``, ``report.md`` and two PNG plots; return results."""
    import numpy as np
    import torch

    from dmoerm.evaluation import bon_curve, combine_rewards, compute_metrics, load_eval, plot_bon_curves
    from dmoerm.model import DMoERM
    from dmoerm.pipeline import _flat, eval_folder, standardized_scores
    from dmoerm.reward_model import RewardModel
    from dmoerm.sampling import generate_samples
    from dmoerm.training.single import train_reward_model

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    proxy_cfg = config.proxies()
    cache = TrunkCache(int(proxy_cfg.trunk_cache_gb * (1 << 30)))
    proxy_run = run_pipeline(proxy_cfg, progress, cache)
    categories = list(proxy_run.sizes)

    # Gold: the proxies' records with clean labels plus more of the same split halves. build_splits takes a
    # prefix of one seeded shuffle per category, so the gold's phase-1/phase-3 records contain the proxies'; dev
    # and test are the same records, and no test prompt is trained on.
    taxonomy = load_taxonomy(proxy_cfg.data.taxonomy)
    records = [r for r in load_preferences(proxy_cfg.data, taxonomy) if r.category in categories]
    half = config.gold_extra_records // 2
    gold_data = dataclasses.replace(
        proxy_cfg.data,
        label_noise=0.0,
        phase1_records=proxy_cfg.data.phase1_records + half,
        phase3_records=proxy_cfg.data.phase3_records + config.gold_extra_records - half,
    )
    splits = build_splits(records, categories, gold_data)
    gold_train = [r for c in categories for r in splits.phase1[c] + splits.phase3[c]]
    dev = [r for c in categories for r in splits.dev[c]]
    tested = {prompt_key(r.conversation) for c in categories for r in splits.test[c]}
    if tested & {prompt_key(r.conversation) for r in gold_train}:
        raise RuntimeError("gold model: a test prompt is in its training data (split bug)")
    gold, _ = train_reward_model(
        gold_train,
        dev,
        proxy_cfg.model,
        dataclasses.replace(proxy_cfg.phase1, epochs=config.gold_epochs, length_penalty=0.0),
        out / "gold",
        cache=cache,
        progress=progress,
    )

    # Held-back prompts and their samples.
    tok, n_tok = gold.tokenizer, gold.max_length
    prompts = []
    for c in categories:
        fitting = [
            r
            for r in splits.test[c]
            if encode(tok, r.conversation, "", n_tok * 4).prompt_length <= config.max_prompt_tokens
        ]
        prompts += [(c, r.conversation) for r in fitting[: config.prompts_per_category]]
    logger.info("overopt: %d held-back prompts, %d samples each", len(prompts), config.n_max)
    samples = generate_samples(
        [conv for _, conv in prompts],
        config.n_max,
        out / "samples.sqlite",
        generator=config.generator,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        progress=progress,
    )
    flat = [encode(tok, conv, s, n_tok) for (_, conv), row in zip(prompts, samples) for s in row]
    lengths = np.array([[len(tok(s, add_special_tokens=False)["input_ids"]) for s in row] for row in samples])
    cache.get(gold.bank, flat, desc="sample trunk" if progress else None)

    shape = (len(prompts), config.n_max)
    gold_scores = score_cached(gold, flat, cache)[0].numpy().reshape(shape)
    gold_scores = gold_scores - gold_scores.mean()  # gold reward relative to the mean sample (n = 1)
    proxy_dir = Path(proxy_run.output_dir)
    proxy_scores = {"DMoERM": score_cached(DMoERM.from_pretrained(proxy_dir / "model"), flat, cache)[0]}
    members = [RewardModel.from_pretrained(proxy_dir / "baseline")]
    members += [
        RewardModel.from_pretrained(proxy_dir / f"baseline_seed{i}") for i in range(1, config.ensemble_size)
    ]
    proxy_scores["single RM"] = score_cached(members[0], flat, cache)[0]
    if len(members) > 1:
        tok_dev = [encode_record(tok, r, n_tok) for r in dev]
        dev_flat, _ = _flat([it for it in tok_dev if it.pairs])
        stacked = standardized_scores(members, flat, dev_flat, cache)  # [N, samples]
        for rule in ("mean", "min", "uwo"):
            proxy_scores[f"RM ensemble ({rule}, N={len(members)})"] = combine_rewards(stacked, rule)

    curves = {"gold (oracle)": bon_curve(gold_scores, gold_scores, lengths=lengths)}
    for name, s in proxy_scores.items():
        curves[name] = bon_curve(torch.as_tensor(s).numpy().reshape(shape), gold_scores, lengths=lengths)
    plot_bon_curves(curves, out / "gold_vs_kl.png", y="gold", title="Best-of-n: gold reward vs KL")
    plot_bon_curves(
        curves, out / "length_vs_kl.png", y="length", title="Best-of-n: chosen length (tokens) vs KL"
    )

    test_recs = [r for c in categories for r in splits.test[c]]
    test_flat, where = _flat([encode_record(tok, r, n_tok) for r in test_recs])
    test_rewards = score_cached(gold, test_flat, cache)[0]
    gold_eval = compute_metrics([test_rewards[w].tolist() for w in where], test_recs, system="gold")
    agreement = {}
    for name in list(proxy_scores):
        path = proxy_dir / "eval" / eval_folder(name) / "eval.json"
        if path.exists():
            agreement[name] = asdict(load_eval(path).overall.agreement)
    results = {
        "config": asdict(config),
        "prompts": len(prompts),
        "samples": len(flat),
        "gold_train_records": len(gold_train),
        "proxy_train_records": sum(
            proxy_run.sizes[c]["phase1"] + proxy_run.sizes[c]["phase3"] for c in categories
        ),
        "proxy_test_agreement": agreement,
        "gold_test_agreement": asdict(gold_eval.overall.agreement),
        "curves": {name: asdict(c) for name, c in curves.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(overopt_markdown(results), encoding="utf-8")
    logger.info("wrote %s", out / "report.md")
    return results


def overopt_markdown(results: dict) -> str:
    """The experiment's tables: gold reward gain and chosen length per n for every proxy."""
    curves = results["curves"]
    names = list(curves)
    first = curves[names[0]]
    cfg = results["config"]
    lines = [
        f"Best-of-n on {results['prompts']} held-back prompts, {cfg['n_max']} samples each; proxies trained on "
        f"{results['proxy_train_records']} records with {100 * cfg['label_noise']:.0f}% of the rankings reversed, "
        f"gold on {results['gold_train_records']} clean records.",
        "",
        "Gold reward of the proxy's choice, relative to the mean sample (higher is better):",
        "",
        "| n | KL (nats) | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for i, n in enumerate(first["ns"]):
        cells = " | ".join(f"{curves[m]['gold'][i]:+.3f}" for m in names)
        lines.append(f"| {n} | {first['kl'][i]:.3f} | {cells} |")
    lines += [
        "",
        "Mean length (tokens) of the chosen response:",
        "",
        "| n | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for i, n in enumerate(first["ns"]):
        cells = " | ".join(f"{curves[m]['length'][i]:.1f}" for m in names)
        lines.append(f"| {n} | {cells} |")
    if results.get("proxy_test_agreement"):
        g = results["gold_test_agreement"]
        lines += [
            "",
            "Agreement with clean human labels on the pipeline's held-back test pairs (95% CI):",
            "",
            f"- gold: {100 * g['value']:.1f} [{100 * g['ci_low']:.1f}, {100 * g['ci_high']:.1f}] (n={g['n']})",
        ]
        lines += [
            f"- {name}: {100 * a['value']:.1f} [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}] (n={a['n']})"
            for name, a in results["proxy_test_agreement"].items()
        ]
    return "\n".join(lines) + "\n"
