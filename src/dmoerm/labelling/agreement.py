"""How good a judge's labels are, measured on pairs with human labels: the agreement tally and its report.

:func:`quality_report` asks the judge about every pair in both orders and compares with the humans:

* **overall preference** (PandaLM, LLMBar, FineGrainedRLHF pairwise preferences): the judge is asked about
  the generic capability :data:`~dmoerm.labelling.prompts.OVERALL` ("overall quality and helpfulness"),
  since these humans said which response is better overall, not per capability point;
* **per capability point** where the data has it (``human_labels``: :class:`CapabilityLabel` s whose
  ``judge`` is a human source, e.g. FineGrainedRLHF's per-aspect error annotations turned into pairs).

It reports, for the paper's strict rule and for the margin rule (when the judge has logits): the share of
pairs the consistency filter keeps, agreement with humans on the kept pairs, agreement counting dropped pairs
as half right, the agreement of a single order (what position bias costs), position bias itself (share of
"position 1" answers, how often the orders disagree, the mean position-1 margin) and pairs per second.
Human ties are excluded from agreement. The report is written as JSON and Markdown (:func:`report_markdown`).
The ``dmoerm label-quality`` command that samples the human-labelled sets is :mod:`dmoerm.labelling.quality`.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.judge import Judge, PositionBias, Verdict, combine_orders
from dmoerm.labelling.pairs import LabelPair, PairResult, iter_pairs, judge_pairs
from dmoerm.labelling.prompts import OVERALL
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import Capability, Taxonomy

logger = logging.getLogger(__name__)


CONFIDENCE_BINS = (0.5, 0.55, 0.6, 0.7, 0.85, 1.0)
"""Edges of the margin rule's confidence bins in the report (agreement per bin: is confidence calibrated?)."""


@dataclass
class _Tally:
    pairs: int = 0
    """Pairs with a human winner (a or b)."""
    human_ties: int = 0
    strict_kept: int = 0
    strict_correct: int = 0
    margin_total: int = 0
    margin_kept: int = 0
    margin_correct: int = 0
    single_total: int = 0
    single_correct: int = 0
    human_a: int = 0
    bins: list = field(default_factory=lambda: [[0, 0] for _ in CONFIDENCE_BINS[1:]])
    """Per confidence bin of the margin rule: [kept, correct]."""
    bias: PositionBias = field(default_factory=PositionBias)

    def add(self, human: str | None, v_ab: Verdict, v_ba: Verdict, min_margin: float) -> None:
        self.bias.add(v_ab, v_ba)
        if human not in ("a", "b"):
            self.human_ties += human == "tie"
            return
        self.pairs += 1
        self.human_a += human == "a"
        d = combine_orders(v_ab, v_ba, "strict")
        if d.winner is not None:
            self.strict_kept += 1
            self.strict_correct += d.winner == human
        if v_ab.margin is not None and v_ba.margin is not None:
            m = combine_orders(v_ab, v_ba, "margin", min_margin)
            self.margin_total += 1
            if m.winner is not None:
                self.margin_kept += 1
                self.margin_correct += m.winner == human
                i = min(bisect.bisect_right(CONFIDENCE_BINS, m.confidence) - 1, len(self.bins) - 1)
                self.bins[max(i, 0)][0] += 1
                self.bins[max(i, 0)][1] += m.winner == human
        if v_ab.choice in ("1", "2"):
            self.single_total += 1
            self.single_correct += (v_ab.choice == "1") == (human == "a")

    def to_dict(self) -> dict:
        def ratio(a: float, b: int) -> float | None:
            return round(a / b, 4) if b else None

        return {
            "pairs": self.pairs,
            "human_ties_excluded": self.human_ties,
            "human_prefers_a_share": ratio(self.human_a, self.pairs),
            "strict": {
                "kept_share": ratio(self.strict_kept, self.pairs),
                "agreement_on_kept": ratio(self.strict_correct, self.strict_kept),
                "agreement_dropped_as_half": ratio(
                    self.strict_correct + 0.5 * (self.pairs - self.strict_kept), self.pairs
                ),
                "kept": self.strict_kept,
            },
            "margin": {
                "pairs": self.margin_total,
                "kept": self.margin_kept,
                "kept_share": ratio(self.margin_kept, self.margin_total),
                "agreement": ratio(self.margin_correct, self.margin_kept),
                "agreement_dropped_as_half": ratio(
                    self.margin_correct + 0.5 * (self.margin_total - self.margin_kept), self.margin_total
                ),
                "by_confidence": [
                    {"confidence": f"{lo:.2f}-{hi:.2f}", "kept": n, "agreement": ratio(c, n)}
                    for (lo, hi), (n, c) in zip(
                        zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]), self.bins, strict=True
                    )
                ],
            },
            "single_order_agreement": ratio(self.single_correct, self.single_total),
            "position_bias": {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.bias.to_dict().items()
            },
        }


def _human_capability_pairs(
    human_labels: Iterable[CapabilityLabel], definitions: dict[str, Capability]
) -> tuple[list[LabelPair], dict[str, list[tuple[Capability, str]]]]:
    """Group per-capability human labels by pair: (pairs, pair key -> [(capability, human winner)])."""
    pairs: dict[str, LabelPair] = {}
    wanted: dict[str, list[tuple[Capability, str]]] = defaultdict(list)
    for lab in human_labels:
        cap = definitions.get(lab.capability)
        if cap is None:
            raise ValueError(
                f"human_labels: capability {lab.capability!r} has no definition; pass it in `capabilities` "
                "or a taxonomy that defines it"
            )
        p = LabelPair(lab.conversation, lab.response_a, lab.response_b, None, lab.judge)
        pairs.setdefault(p.key, p)
        wanted[p.key].append((cap, lab.winner))
    return list(pairs.values()), wanted


def _capability_definitions(
    capabilities: Sequence[Capability], taxonomy: Taxonomy | None
) -> dict[str, Capability]:
    definitions = {c.name: c for c in capabilities}
    if taxonomy is not None:
        for cat in taxonomy.categories:
            for c in cat.capabilities:
                definitions.setdefault(c.name, c)
    return definitions


class _Agreement:
    """The tallies of one report: overall preference (all and by source), per capability point, label mass."""

    def __init__(self, min_margin: float):
        self.min_margin = min_margin
        self.total = _Tally()
        self.by_source: dict[str, _Tally] = defaultdict(_Tally)
        self.per_cap: dict[str, _Tally] = defaultdict(_Tally)
        self.judged = 0
        self.masses: list[float] = []

    def mass(self, *verdicts: Verdict) -> None:
        """A local judge's probability mass on the two answer labels, from its raw answer."""
        for v in verdicts:
            if v.raw.startswith('{"logp"'):
                try:
                    self.masses.append(float(json.loads(v.raw)["mass"]))
                except (ValueError, KeyError, TypeError):
                    pass

    def add_overall(self, res: PairResult) -> None:
        self.judged += 1
        v_ab, v_ba = res.ab[0], res.ba[0]
        self.mass(v_ab, v_ba)
        self.total.add(res.pair.human, v_ab, v_ba, self.min_margin)
        source = res.pair.source.split("/")[0] or "unknown"
        self.by_source[source].add(res.pair.human, v_ab, v_ba, self.min_margin)

    def add_capabilities(self, res: PairResult, human: dict[str, str]) -> None:
        self.judged += 1
        for cap, v_ab, v_ba in zip(res.capabilities, res.ab, res.ba, strict=True):
            self.mass(v_ab, v_ba)
            self.per_cap[cap.name].add(human[cap.name], v_ab, v_ba, self.min_margin)


async def _judge_against_humans(
    agreement: _Agreement,
    judge: Judge,
    pairs: list[LabelPair],
    cap_pairs: list[LabelPair],
    wanted: dict[str, list[tuple[Capability, str]]],
    overall: Capability,
    language: str,
    bar,
) -> None:
    """Ask the judge about the overall-preference pairs, then the per-capability pairs; tally each result."""

    def plan_caps(pair: LabelPair):
        return None, tuple(dict.fromkeys(c for c, _ in wanted[pair.key]))

    try:
        async for res in judge_pairs(pairs, lambda pair: (None, (overall,)), judge, language):
            bar.update(1)
            agreement.add_overall(res)
        async for res in judge_pairs(cap_pairs, plan_caps, judge, language):
            bar.update(1)
            agreement.add_capabilities(res, dict((c.name, w) for c, w in wanted[res.pair.key]))
    finally:
        await judge.aclose()


def _report(agreement: _Agreement, judge: Judge, js, overall: Capability, elapsed: float) -> dict:
    judged = agreement.judged
    return {
        "judge": judge.name,
        "judge_identity": judge.identity,
        "overall_capability": {"name": overall.name, "definition": overall.definition},
        "overall": agreement.total.to_dict(),
        "by_source": {k: v.to_dict() for k, v in sorted(agreement.by_source.items())},
        "per_capability": {k: v.to_dict() for k, v in sorted(agreement.per_cap.items())},
        "speed": {
            "pairs_judged": judged,
            "elapsed_s": round(elapsed, 2),
            "pairs_per_s": round(judged / elapsed, 4) if elapsed > 0 else None,
            "questions_asked": js.asked,
            "questions_cached": js.cached,
            "note": "cached questions cost nothing; rerun with an empty cache for speed",
        },
        "tokens": {"prompt": js.prompt_tokens, "completion": js.completion_tokens, "cost": round(js.cost, 6)},
        "answer_label_mass": _mass_summary(agreement.masses),
        "retries": dict(js.retries),
        "malformed": js.malformed,
        "failed": js.failed,
    }


def _write_report(report: dict, out_dir: str | Path, name: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / f"{name}.md").write_text(report_markdown(report), encoding="utf-8")
    logger.info("label-quality report written to %s/%s.{json,md}", out, name)


def quality_report(
    records: Iterable[PreferenceRecord | LabelPair],
    judge: Judge,
    out_dir: str | Path | None = None,
    *,
    overall: Capability = OVERALL,
    human_labels: Iterable[CapabilityLabel] = (),
    capabilities: Sequence[Capability] = (),
    taxonomy: Taxonomy | None = None,
    language: str = "auto",
    min_margin: float = 0.0,
    name: str = "label_quality",
    command: str | None = None,
    progress: bool = False,
    extra: dict | None = None,
) -> dict:
    """Agreement of ``judge`` with human labels, consistency-filter kept share, position bias, speed.

    Args:
        records: pairs with a human overall preference (``PreferenceRecord`` ranks, or ``LabelPair.human``);
            grouped in the report by ``source``.
        judge: the judge to evaluate (its cache is used; cached answers do not count towards speed).
        out_dir: where ``<name>.json`` and ``<name>.md`` go; None writes nothing.
        overall: the capability asked for overall preference (default :data:`OVERALL`).
        human_labels: per-capability human labels (``winner`` a/b/tie); compared per capability point.
        capabilities, taxonomy: definitions of the capability points named in ``human_labels``.
        language: prompt language (``auto``, ``en``, ``zh``).
        min_margin: the margin rule's drop threshold.
        command: the command that produced the report, recorded in it.
        progress: show a progress bar (pairs, with ETA).
        extra: more fields for the report (e.g. the configuration and the sample sizes), stored as they are.

    Returns:
        The report as a dict (what the JSON file holds).
    """
    from tqdm.auto import tqdm

    pairs = list(iter_pairs(records))
    cap_pairs, wanted = _human_capability_pairs(human_labels, _capability_definitions(capabilities, taxonomy))
    agreement = _Agreement(min_margin)
    before = judge.stats.copy()
    bar = tqdm(
        total=len(pairs) + len(cap_pairs), unit="pair", desc="label-quality", disable=not progress,
        dynamic_ncols=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        asyncio.run(_judge_against_humans(agreement, judge, pairs, cap_pairs, wanted, overall, language, bar))
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    report = {**_report(agreement, judge, judge.stats.minus(before), overall, elapsed), "command": command,
              **(extra or {})}  # fmt: skip
    if out_dir is not None:
        _write_report(report, out_dir, name)
    return report


def _mass_summary(masses: list[float]) -> dict | None:
    """How much next-token probability a local judge puts on the two answer labels (low: the model wants to
    say something else, and its margins mean little)."""
    if not masses:
        return None
    xs = sorted(masses)
    return {"questions": len(xs), "median": round(xs[len(xs) // 2], 4), "mean": round(sum(xs) / len(xs), 4)}


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def report_markdown(report: dict) -> str:
    """The report as Markdown tables."""
    header = [
        "| set | pairs | strict kept share | strict agreement (kept) | strict agreement (dropped = ½) "
        "| margin kept share | margin agreement (kept) | single-order agreement | position-1 share "
        "| order disagreement | mean position-1 margin |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"# Label quality: {report['judge']}",
        "",
        f"Overall preference asked as capability `{report['overall_capability']['name']}`: "
        f"{report['overall_capability']['definition']}.",
        "",
        *header,
    ]

    def row(name: str, t: dict) -> str:
        pb = t["position_bias"]
        return (
            f"| {name} | {t['pairs']} | {_fmt(t['strict']['kept_share'])} | {_fmt(t['strict']['agreement_on_kept'])} "
            f"| {_fmt(t['strict']['agreement_dropped_as_half'])} | {_fmt(t['margin']['kept_share'])} "
            f"| {_fmt(t['margin']['agreement'])} | {_fmt(t['single_order_agreement'])} "
            f"| {_fmt(pb['first_position_share'])} | {_fmt(pb['order_disagreement'])} "
            f"| {_fmt(pb['mean_position1_margin'])} |"
        )

    for src, t in report["by_source"].items():
        lines.append(row(src, t))
    lines.append(row("**all**", report["overall"]))
    if report["per_capability"]:
        lines += ["", "Per capability point (human per-aspect labels):", "", *header]
        for cap, t in report["per_capability"].items():
            lines.append(row(cap, t))
    bins = report["overall"]["margin"].get("by_confidence") or []
    if any(b["kept"] for b in bins):
        lines += [
            "",
            "Margin rule, overall preference: agreement by confidence (is the confidence calibrated?):",
            "",
            "| confidence | pairs | agreement |",
            "|---|---|---|",
        ]
        lines += [f"| {b['confidence']} | {b['kept']} | {_fmt(b['agreement'])} |" for b in bins if b["kept"]]
    sp = report["speed"]
    lines += [
        "",
        f"Speed: {sp['pairs_judged']} pairs in {sp['elapsed_s']} s = {_fmt(sp['pairs_per_s'])} pairs/s "
        f"({sp['questions_asked']} questions asked, {sp['questions_cached']} from the cache).",
    ]
    lm = report.get("answer_label_mass")
    if lm:
        lines.append(
            f"Probability mass on the two answer labels (local judge): median {lm['median']:.3f}, "
            f"mean {lm['mean']:.3f} over {lm['questions']} questions."
        )
    tok = report.get("tokens") or {}
    if tok.get("prompt") or tok.get("completion"):
        lines.append(f"Tokens: {tok['prompt']} prompt + {tok['completion']} completion; cost {tok['cost']}.")
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    if report.get("config"):
        lines += ["", "Configuration:", "", "```json", json.dumps(report["config"], indent=1), "```"]
    return "\n".join(lines) + "\n"
