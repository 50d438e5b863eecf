"""The scaling study (issue 13): DMoERM and the single reward model trained at several numbers of records per
category, on nested subsets of one fixed prompt-disjoint split, tested on one fixed test set and on bundled
human-labelled sets they never trained on; plus the ablations at the largest size (each lever off in turn).

Every run is an ordinary ``dmoerm train`` run in its own folder (resumable, fingerprinted by its own
state.json); all of them share one trunk-state cache, so a response's frozen trunk states are computed once for
the whole study. ``dmoerm scaling --config configs/scaling.yaml`` runs it; ``scaling.md`` and the PNGs in the
output folder are rewritten from the runs' saved evaluations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmoerm.pipeline.files import copy_folder, save_figure, write_eval, write_json, write_text
from dmoerm.pipeline.report import eval_folder

logger = logging.getLogger(__name__)

OOD_SOURCES = ("pandalm/test", "llmbar/natural", "llmbar/adversarial")


@dataclass
class ScalingConfig:
    """``dmoerm scaling --config FILE``: which runs the study makes and where it writes them."""

    base_config: str = "configs/main.yaml"
    """The pipeline config every run starts from (backbone, budgets, levers)."""
    output_dir: str = "runs/scaling"
    """One folder per run (``n<records>_seed<seed>``, ``ablation_<name>``), the summary and the plots."""
    sizes: list[int] = field(default_factory=lambda: [24, 96, 384])
    """Phase-1 and phase-3 records per category of each size (nested: a larger size holds the smaller)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Training seeds (router, phases, single RM); the data split's seed stays fixed."""
    seeds_up_to: int = 96
    """Sizes up to this one run every seed; larger sizes run the first seed only."""
    test_records: int = 100
    """Test records per category, the same at every size."""
    dev_records: int = 16
    """Dev records per category (early stopping and the warm start's and aggregator's "no change" check)."""
    label_records: int = 6
    """Judge-labelled records per category at most, whatever the size (caps the judge's share of the time)."""
    overrides: list[str] = field(default_factory=list)
    """``section.field=value`` applied to every run (as ``dmoerm train --set``)."""
    ablations: dict[str, list[str]] = field(default_factory=dict)
    """Name -> overrides, each run at the largest size with the first seed (e.g. ``cold start:
    [warm_start=none]``)."""
    ablation_sizes: list[int] | None = None
    """Sizes the ablations run at (first seed); None runs them at the largest size only."""
    ablation_sizes_of: dict[str, list[int]] = field(default_factory=dict)
    """Ablation name -> its own sizes, instead of ``ablation_sizes`` (e.g. the old recipe at every size)."""
    ood_sources: list[str] = field(default_factory=lambda: list(OOD_SOURCES))
    """Bundled human-labelled sets no run trains on, scored by every run's DMoERM and single RM."""

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(n, int) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes: need positive integers, got {self.sizes!r}")
        if not self.seeds:
            raise ValueError("seeds: name at least one seed")
        if self.test_records < 1:
            raise ValueError(f"test_records: must be >= 1, got {self.test_records}")

    @classmethod
    def from_file(cls, path: str | Path) -> ScalingConfig:
        """Read a YAML/JSON file of these fields; unknown fields are errors naming the file."""
        import yaml

        try:
            obj = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**obj)

    def runs(self) -> list[tuple[str, list[str]]]:
        """(run name, overrides) of every run in the order they run: by size, each size's seeds then its
        ablations (``ablation_<name>_n<size>``), so the small sizes' comparisons are finished first."""
        default = sorted(self.ablation_sizes or [max(self.sizes)])
        at = {name: sorted(self.ablation_sizes_of.get(name, default)) for name in self.ablations}
        out = []
        for n in sorted(set(self.sizes).union(*at.values())):
            if n in self.sizes:
                for seed in self.seeds if n <= self.seeds_up_to else self.seeds[:1]:
                    out.append((f"n{n}_seed{seed}", self._size(n) + _seeded(seed)))
            for name, extra in self.ablations.items():
                if n in at[name]:
                    run = f"ablation_{_slug(name)}_n{n}"
                    out.append((run, self._size(n) + _seeded(self.seeds[0]) + list(extra)))
        return out

    def _size(self, n: int) -> list[str]:
        return [
            f"data.phase1_records={n}",
            f"data.phase3_records={n}",
            f"data.label_records={min(n, self.label_records)}",
            f"data.test_records={self.test_records}",
            f"data.dev_records={self.dev_records}",
            *self.overrides,
        ]


def _seeded(seed: int) -> list[str]:
    return [f"{s}.seed={seed}" for s in ("router", "phase1", "phase2", "phase3")]


def _slug(name: str) -> str:
    return "_".join("".join(ch if ch.isalnum() else " " for ch in name.lower()).split())


def run_scaling(config: ScalingConfig, progress: bool = True, only: Sequence[str] = ()) -> dict:
    """Run (or resume) every run of the study (or the runs named in ``only``), score the out-of-distribution
    sets, write the summary of every finished run."""
    from dmoerm.pipeline.config import PipelineConfig
    from dmoerm.pipeline.run import run_pipeline
    from dmoerm.training.trunk_cache import TrunkCache

    names = [name for name, _ in config.runs()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(
            f"--only: no run named {', '.join(unknown)} in this study; its runs: {', '.join(names)}"
        )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scaling_config.json", asdict(config))
    cache = None
    of_size: dict[int, list[tuple[Path, object]]] = {}  # size -> (run folder, config) of its runs so far
    for name, overrides in config.runs():
        run_dir = out / name
        pc = PipelineConfig.from_file(config.base_config, [*overrides, f"output_dir={run_dir}"])
        size = pc.data.phase1_records
        earlier = list(of_size.get(size, [])) if name.startswith("ablation_") else []
        of_size.setdefault(size, []).append((run_dir, pc))
        if only and name not in only:
            continue
        for source_dir, source_config in earlier:  # the first with the very same single-RM inputs
            if _reuse_baseline(run_dir, source_dir, source_config, pc):
                break
        if cache is None:  # one trunk cache for the whole study: every run shares the backbone and data
            cache = TrunkCache(int(pc.trunk_cache_gb * (1 << 30)), pc.trunk_cache_dir)
        t0 = time.perf_counter()
        logger.info("scaling: run %s", name)
        run_pipeline(pc, progress=progress, cache=cache)
        _score_ood(run_dir, config.ood_sources, pc.data.data_dir, cache)
        seconds = json.loads((run_dir / "state.json").read_text()).get("_timings", {})
        logger.info("scaling: %s done in %.0f s this time", name, time.perf_counter() - t0)
        write_json(run_dir / "wall_seconds.json", seconds)
    summary = summarize(out, config)
    write_scaling_report(summary, out)
    return summary


def _reuse_baseline(run_dir: Path, source_dir: Path, source_config, config) -> bool:
    """Copy the single RM of ``source_dir`` into ``run_dir`` when both runs give it the very same inputs (data,
    model, phase 1: :func:`dmoerm.pipeline.state.stage_inputs`): an ablation of DMoERM's levers does not change the
    baseline, and retraining it would cost each ablation as much as the run itself. True when ``run_dir`` has
    its single RM (already, or copied now)."""
    from dmoerm.pipeline.state import stage_inputs
    from dmoerm.reward_model import MODEL_FILE

    source, target = source_dir / "baseline", run_dir / "baseline"
    if target.exists():
        return True
    if not (source / MODEL_FILE).exists():
        return False
    if stage_inputs(config, "baseline") != stage_inputs(source_config, "baseline"):
        return False
    copy_folder(source, target)
    logger.info("scaling: %s reuses the single RM of %s (same inputs)", run_dir.name, source_dir.name)
    return True


def _score_ood(run_dir: Path, sources: Sequence[str], data_dir, cache) -> None:
    """Every system of a run (DMoERM and the single RM) on each bundled out-of-distribution set; the router
    picks DMoERM's inner model (these records have no category of the taxonomy)."""
    from dmoerm.data import load_data
    from dmoerm.encoding import encode_record
    from dmoerm.evaluation import compute_metrics, response_token_lengths
    from dmoerm.model import load_model
    from dmoerm.pipeline.evaluate import score_cached
    from dmoerm.scoring import flatten

    systems = {"DMoERM": run_dir / "model", "single RM": run_dir / "baseline"}
    records: dict[str, list] = {}  # source -> its records with untied pairs, loaded once
    for system, path in systems.items():
        todo = [
            s
            for s in sources
            if not (run_dir / "ood" / eval_folder(s) / eval_folder(system) / "eval.json").exists()
        ]
        if not todo or not path.exists():
            continue
        model = load_model(path)  # once per system, for every source
        for source in todo:
            if source not in records:
                records[source] = [r for r in load_data(source, data_dir) if len(r.pairs()) > 0]
            recs = records[source]
            flat, where = flatten([encode_record(model.tokenizer, r, model.max_length) for r in recs])
            rewards, _, _ = score_cached(model, flat, cache)
            result = compute_metrics(
                [rewards[w].tolist() for w in where],
                recs,
                categories=[source] * len(recs),
                token_lengths=response_token_lengths(model.tokenizer, recs),
                system=system,
            )
            write_eval(result, run_dir / "ood" / eval_folder(source) / eval_folder(system))


def _point(result) -> dict:
    o = result.overall
    return {
        "agreement": o.agreement.value,
        "ci": [o.agreement.ci_low, o.agreement.ci_high],
        "pairs": o.agreement.n,
        "shorter_better": o.length.when_shorter_better.value,
        "shorter_better_pairs": o.length.when_shorter_better.n,
        "longer_better": o.length.when_longer_better.value,
        "longer_wins_rule": o.length.longer_wins_baseline.value,
    }


def summarize(out: Path, config: ScalingConfig) -> dict:
    """Every finished run's in-distribution and out-of-distribution points, by run name and system."""
    from dmoerm.evaluation import load_eval

    runs = {}
    for name, _ in config.runs():
        run_dir = out / name
        if not (run_dir / "state.json").exists():
            continue
        entry = {
            "test": {},
            "ood": {},
            "seconds": json.loads((run_dir / "state.json").read_text()).get("_timings", {}),
        }
        for p in sorted(run_dir.glob("eval/*/eval.json")):
            result = load_eval(p)
            entry["test"][result.system or p.parent.name] = _point(result)
        for source in config.ood_sources:  # keyed by the source's name, as the report's tables look it up
            for p in sorted((run_dir / "ood" / eval_folder(source)).glob("*/eval.json")):
                result = load_eval(p)
                entry["ood"].setdefault(source, {})[result.system or p.parent.name] = _point(result)
        runs[name] = entry
    summary = {"config": asdict(config), "runs": runs}
    write_json(out / "summary.json", summary)
    return summary


def _by_size(summary: dict, config: ScalingConfig, system: str, key: str, ood: str | None = None):
    """(sizes, mean over seeds, every seed's value) of one system's metric."""
    sizes, means, points = [], [], []
    for n in sorted(config.sizes):
        vals = []
        for name, entry in summary["runs"].items():
            if not name.startswith(f"n{n}_seed"):
                continue
            block = entry["ood"].get(ood, {}) if ood else entry["test"]
            if system in block:
                vals.append(100 * block[system][key])
        if vals:
            sizes.append(n)
            means.append(sum(vals) / len(vals))
            points.append(vals)
    return sizes, means, points


def write_scaling_report(summary: dict, out: Path) -> Path:
    """``scaling.md`` (tables) and ``scaling_*.png`` (agreement against records per category)."""
    config = ScalingConfig(**summary["config"])
    systems = ["DMoERM", "single RM"]
    lines = [
        "# Scaling study",
        "",
        "Agreement (%) with human preferences; mean over seeds (each seed in brackets).",
        "",
    ]
    for title, ood in [("In-distribution test set", None)] + [
        (f"Out of distribution: {s}", s) for s in config.ood_sources
    ]:
        head = "| records per category | " + " | ".join(f"{s} (all)" for s in systems) + " | "
        head += " | ".join(f"{s} (shorter better)" for s in systems) + " | longer-wins rule | pairs |"
        lines += [f"## {title}", "", head, "|" + "---:|" * (2 * len(systems) + 3)]
        for n in sorted(config.sizes):
            cells = []
            for key in ("agreement", "shorter_better"):
                for s in systems:
                    sizes, m, p = _by_size(summary, config, s, key, ood)
                    i = sizes.index(n) if n in sizes else None
                    cells.append("-" if i is None else f"{m[i]:.1f} [{', '.join(f'{v:.1f}' for v in p[i])}]")
            ref = _reference(summary, n, ood)
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {ref[0]} | {ref[1]} |")
        lines.append("")
    lines += _ablation_lines(summary)
    lines += _seconds_lines(summary)
    _plot(summary, config, out)
    lines += ["", "![agreement vs records](scaling_test.png)", ""]
    return write_text(out / "scaling.md", "\n".join(lines) + "\n")


def _reference(summary: dict, n: int, ood: str | None) -> tuple[str, str]:
    for name, entry in summary["runs"].items():
        if name.startswith(f"n{n}_seed"):
            block = entry["ood"].get(ood, {}) if ood else entry["test"]
            for point in block.values():
                return f"{100 * point['longer_wins_rule']:.1f}", str(point["pairs"])
    return "-", "-"


def _ablation_lines(summary: dict) -> list[str]:
    rows = [(n, e) for n, e in summary["runs"].items() if n.startswith("ablation_")]
    if not rows:
        return []
    lines = [
        "## Ablations (first seed)",
        "",
        "| run | DMoERM | shorter better | single RM |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in rows:
        d, s = entry["test"].get("DMoERM"), entry["test"].get("single RM")
        lines.append(
            f"| {name.removeprefix('ablation_')} | {_pct(d, 'agreement')} | {_pct(d, 'shorter_better')} | {_pct(s, 'agreement')} |"
        )
    return lines + [""]


def _pct(point: dict | None, key: str) -> str:
    return "-" if point is None else f"{100 * point[key]:.1f}"


def _seconds_lines(summary: dict) -> list[str]:
    lines = ["## Wall time per run (seconds, the run's own stages)", "", "| run | seconds |", "|---|---:|"]
    for name, entry in summary["runs"].items():
        total = sum(
            v for k, v in entry["seconds"].items() if k != "total_this_run" and isinstance(v, (int, float))
        )
        lines.append(f"| {name} | {total:.0f} |")
    return lines


def _plot(summary: dict, config: ScalingConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("all test pairs", "agreement"),
        ("test pairs where the shorter answer is better", "shorter_better"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, key) in zip(axes, panels):
        for system, style in (("DMoERM", "o-"), ("single RM", "s--")):
            sizes, means, points = _by_size(summary, config, system, key)
            if not sizes:
                continue
            x = [math.log2(n) for n in sizes]
            ax.plot(x, means, style, label=system)  # NaN points (no such pairs) are left out
            for xi, vals in zip(x, points):
                ax.scatter([xi] * len(vals), vals, s=10, alpha=0.5)
        sizes = sorted(config.sizes)
        ref = [_reference(summary, n, None)[0] for n in sizes]
        if key == "agreement" and all(r != "-" for r in ref):
            x = [math.log2(n) for n in sizes]
            ax.plot(x, [float(r) for r in ref], ":", color="gray", label="longer-wins rule")
        ax.axhline(50, color="lightgray", lw=0.8)
        ax.set_xticks([math.log2(n) for n in sizes], [str(n) for n in sizes])  # sizes grow by factors
        ax.set_xlabel("records per category (phase 1 and phase 3 each)")
        ax.set_ylabel("agreement with humans (%)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "scaling_test.png", dpi=100)
    plt.close(fig)
