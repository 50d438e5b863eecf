"""Best-of-n over-optimisation (``dmoerm overopt``; issue 5; Gao et al. 2022, Coste et al. 2023).

Noisy proxies (DMoERM, the single reward model and ensembles of seeded single models) pick the best of n samples
of held-back prompts; a gold reward model trained on clean labels judges the picks. The gold reward and the
length of each proxy's choice are estimated without bias for every n (:mod:`dmoerm.evaluation.best_of_n`) and
plotted against ``KL = log n - (n - 1) / n``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dmoerm.data import conversation_key
from dmoerm.encoding import encode, encode_record
from dmoerm.evaluation.best_of_n import BonCurve, bon_curve, plot_bon_curves
from dmoerm.evaluation.ensembles import combine_rewards
from dmoerm.evaluation.metrics import compute_metrics
from dmoerm.evaluation.results import EvalResult, load_eval
from dmoerm.pipeline import (
    PipelineConfig,
    build_splits,
    eval_folder,
    load_preferences,
    run_pipeline,
    score_cached,
    standardized_scores,
)
from dmoerm.scoring import flatten
from dmoerm.taxonomy import load_taxonomy
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


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
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    proxy_cfg = config.proxies()
    cache = TrunkCache(int(proxy_cfg.trunk_cache_gb * (1 << 30)))
    proxy_run = run_pipeline(proxy_cfg, progress, cache)
    categories = list(proxy_run.sizes)
    gold, splits, gold_train, dev = _train_gold(config, proxy_cfg, categories, cache, progress)

    # Held-back prompts and their samples.
    tok, n_tok = gold.tokenizer, gold.max_length
    prompts, samples = _sample_prompts(config, splits, categories, tok, n_tok, progress)
    flat = [encode(tok, conv, s, n_tok) for (_, conv), row in zip(prompts, samples) for s in row]
    lengths = np.array([[len(tok(s, add_special_tokens=False)["input_ids"]) for s in row] for row in samples])
    cache.get(gold.bank, flat, desc="sample trunk" if progress else None)

    shape = (len(prompts), config.n_max)
    gold_scores = score_cached(gold, flat, cache)[0].numpy().reshape(shape)
    gold_scores = gold_scores - gold_scores.mean()  # gold reward relative to the mean sample (n = 1)
    proxy_dir = Path(proxy_run.output_dir)
    proxy_scores = _proxy_scores(config, proxy_dir, flat, dev, tok, n_tok, cache)
    curves = _bon_curves(gold_scores, proxy_scores, lengths, shape, out)

    gold_eval = _gold_test_eval(gold, splits, categories, tok, n_tok, cache)
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


def _train_gold(
    config: OverOptConfig, proxy_cfg: PipelineConfig, categories: list[str], cache, progress: bool
):
    """The gold model, trained (or loaded) on the proxies' records with clean labels plus more of the same split
    halves; returns it with the splits, its training records and the dev records."""
    from dmoerm.training.single import train_reward_model

    # build_splits takes a prefix of one seeded shuffle per category, so the gold's phase-1/phase-3 records
    # contain the proxies'; dev and test are the same records, and no test prompt is trained on.
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
    tested = {conversation_key(r.conversation) for c in categories for r in splits.test[c]}
    if tested & {conversation_key(r.conversation) for r in gold_train}:
        raise RuntimeError("gold model: a test prompt is in its training data (split bug)")
    gold, _ = train_reward_model(
        gold_train,
        dev,
        proxy_cfg.model,
        dataclasses.replace(proxy_cfg.phase1, epochs=config.gold_epochs, length_penalty=0.0),
        Path(config.output_dir) / "gold",
        cache=cache,
        progress=progress,
    )
    return gold, splits, gold_train, dev


def _sample_prompts(config: OverOptConfig, splits, categories: list[str], tok, n_tok: int, progress: bool):
    """The first ``prompts_per_category`` held-back test prompts per category that fit ``max_prompt_tokens``,
    as ``(category, conversation)``, and their ``n_max`` samples each (cached in ``samples.sqlite``)."""
    from dmoerm.sampling import generate_samples

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
        Path(config.output_dir) / "samples.sqlite",
        generator=config.generator,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        progress=progress,
    )
    return prompts, samples


def _proxy_scores(config: OverOptConfig, proxy_dir: Path, flat, dev, tok, n_tok: int, cache) -> dict:
    """Each proxy's reward of every sample (flat): DMoERM, the single RM and, with more than one member, the
    ensembles of the members standardised on the dev pairs under every rule."""
    from dmoerm.model import DMoERM
    from dmoerm.reward_model import RewardModel

    proxy_scores = {"DMoERM": score_cached(DMoERM.from_pretrained(proxy_dir / "model"), flat, cache)[0]}
    members = [RewardModel.from_pretrained(proxy_dir / "baseline")]
    members += [
        RewardModel.from_pretrained(proxy_dir / f"baseline_seed{i}") for i in range(1, config.ensemble_size)
    ]
    proxy_scores["single RM"] = score_cached(members[0], flat, cache)[0]
    if len(members) > 1:
        tok_dev = [encode_record(tok, r, n_tok) for r in dev]
        dev_flat, _ = flatten([it for it in tok_dev if it.pairs])
        stacked = standardized_scores(members, flat, dev_flat, cache)  # [N, samples]
        for rule in ("mean", "min", "uwo"):
            proxy_scores[f"RM ensemble ({rule}, N={len(members)})"] = combine_rewards(stacked, rule)
    return proxy_scores


def _bon_curves(gold_scores: np.ndarray, proxy_scores: dict, lengths: np.ndarray, shape, out: Path):
    """The best-of-n curve of the gold itself (the oracle) and of every proxy; both plots written to ``out``."""
    import torch

    curves: dict[str, BonCurve] = {"gold (oracle)": bon_curve(gold_scores, gold_scores, lengths=lengths)}
    for name, s in proxy_scores.items():
        curves[name] = bon_curve(torch.as_tensor(s).numpy().reshape(shape), gold_scores, lengths=lengths)
    plot_bon_curves(curves, out / "gold_vs_kl.png", y="gold", title="Best-of-n: gold reward vs KL")
    plot_bon_curves(
        curves, out / "length_vs_kl.png", y="length", title="Best-of-n: chosen length (tokens) vs KL"
    )
    return curves


def _gold_test_eval(gold, splits, categories: list[str], tok, n_tok: int, cache) -> EvalResult:
    """The gold model's metrics on the pipeline's held-back test records (clean labels)."""
    test_recs = [r for c in categories for r in splits.test[c]]
    test_flat, where = flatten([encode_record(tok, r, n_tok) for r in test_recs])
    test_rewards = score_cached(gold, test_flat, cache)[0]
    return compute_metrics([test_rewards[w].tolist() for w in where], test_recs, system="gold")


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
