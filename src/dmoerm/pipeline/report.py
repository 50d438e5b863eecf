"""``report.md`` of a run, rewritten from what the run saved (config, sizes, state, ``eval/*/eval.json``,
curves), so evaluations added later join it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dmoerm.pipeline.files import write_text

logger = logging.getLogger(__name__)

_SYSTEM_ORDER = (
    "DMoERM",
    "DMoERM, experts averaged",
    "per-category RMs (routed)",
    "DMoERM, labelled category",
    "single RM",
)


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
    lines += _category_lines(sizes, done)
    lines += _expert_lines(done)
    lines += _gate_lines(sizes, done)
    lines += ["", "## Wall time (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    curves = sorted(run.glob("curves/*.png"))
    if curves:
        lines += ["", "## Curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(run).as_posix()})" for p in curves]
    path = write_text(run / "report.md", "\n".join(lines) + "\n")
    logger.info("wrote %s", path)
    return path


def _category_lines(sizes: dict, done: dict) -> list[str]:
    """Per category: records of each split, dev agreement of phases 1 and 3, labels kept and experts."""
    lines = [
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
    return lines


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


def _gate_lines(sizes: dict, done: dict) -> list[str]:
    """Per category, each sign-test gate's decision (``specialise.gate_alpha``, ``phase3.gate_alpha``): the
    pairs the change turned right and wrong against its start, the one-sided p, and whether it was kept;
    nothing when the run gated nothing."""
    gates = {
        (c, phase): done.get(f"{phase}/{c}", {}).get("gate") for c in sizes for phase in ("phase1", "phase3")
    }
    if not any(gates.values()):
        return []

    def cell(gate: dict | None) -> str:
        if not gate:
            return "-"
        verdict = "kept" if gate["kept"] else "back to its start"
        return f"{gate['turned_right']} / {gate['turned_wrong']}, p = {gate['p']:.3g}: {verdict}"

    lines = [
        "",
        "## Sign-test gates (pairs turned right / wrong against the start)",
        "",
        "Phase 1's specialisation of the pooled start and phase 3's correction of the phase-1 reward are kept only"
        " when the pairs they turn right outnumber those they turn wrong by a one-sided sign test; otherwise the"
        " category scores exactly as its start.",
        "",
        "| category | phase 1: specialisation | phase 3: correction |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {cell(gates[c, 'phase1'])} | {cell(gates[c, 'phase3'])} |" for c in sizes]
    kept = sum(bool(g and g["kept"]) for g in gates.values())
    return [*lines, "", f"{kept} of {sum(bool(g) for g in gates.values())} gates kept their change."]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
