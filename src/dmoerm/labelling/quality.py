"""How good a judge's labels are, measured on pairs with human labels.

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
Human ties are excluded from agreement. The report is written as JSON and Markdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.judge import Judge, PositionBias, Verdict, combine_orders
from dmoerm.labelling.pipeline import LabelPair, iter_pairs, judge_pairs
from dmoerm.labelling.prompts import OVERALL
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import Capability, Taxonomy

logger = logging.getLogger(__name__)


@dataclass
class _Tally:
    pairs: int = 0
    """Pairs with a human winner (a or b)."""
    human_ties: int = 0
    strict_kept: int = 0
    strict_correct: int = 0
    margin_total: int = 0
    margin_correct: int = 0
    single_total: int = 0
    single_correct: int = 0
    bias: PositionBias = field(default_factory=PositionBias)

    def add(self, human: str | None, v_ab: Verdict, v_ba: Verdict, min_margin: float) -> None:
        self.bias.add(v_ab, v_ba)
        if human not in ("a", "b"):
            self.human_ties += human == "tie"
            return
        self.pairs += 1
        d = combine_orders(v_ab, v_ba, "strict")
        if d.winner is not None:
            self.strict_kept += 1
            self.strict_correct += d.winner == human
        if v_ab.margin is not None and v_ba.margin is not None:
            m = combine_orders(v_ab, v_ba, "margin", min_margin)
            self.margin_total += 1
            self.margin_correct += m.winner == human
        if v_ab.choice in ("1", "2"):
            self.single_total += 1
            self.single_correct += (v_ab.choice == "1") == (human == "a")

    def to_dict(self) -> dict:
        def ratio(a: float, b: int) -> float | None:
            return round(a / b, 4) if b else None

        return {
            "pairs": self.pairs,
            "human_ties_excluded": self.human_ties,
            "strict": {
                "kept_share": ratio(self.strict_kept, self.pairs),
                "agreement_on_kept": ratio(self.strict_correct, self.strict_kept),
                "agreement_dropped_as_half": ratio(
                    self.strict_correct + 0.5 * (self.pairs - self.strict_kept), self.pairs
                ),
                "kept": self.strict_kept,
            },
            "margin": {
                "agreement": ratio(self.margin_correct, self.margin_total),
                "pairs": self.margin_total,
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

    Returns:
        The report as a dict (what the JSON file holds).
    """
    pairs = list(iter_pairs(records))
    definitions = {c.name: c for c in capabilities}
    if taxonomy is not None:
        for cat in taxonomy.categories:
            for c in cat.capabilities:
                definitions.setdefault(c.name, c)
    cap_pairs, wanted = _human_capability_pairs(human_labels, definitions)

    overall_by_source: dict[str, _Tally] = defaultdict(_Tally)
    total = _Tally()
    per_cap: dict[str, _Tally] = defaultdict(_Tally)
    before = judge.stats.copy()
    judged = 0

    def plan_overall(pair: LabelPair):
        return None, (overall,)

    def plan_caps(pair: LabelPair):
        caps = tuple(dict.fromkeys(c for c, _ in wanted[pair.key]))
        return None, caps

    async def run() -> None:
        nonlocal judged
        try:
            async for res in judge_pairs(pairs, plan_overall, judge, language):
                judged += 1
                v_ab, v_ba = res.ab[0], res.ba[0]
                total.add(res.pair.human, v_ab, v_ba, min_margin)
                overall_by_source[res.pair.source.split("/")[0] or "unknown"].add(
                    res.pair.human, v_ab, v_ba, min_margin
                )
            async for res in judge_pairs(cap_pairs, plan_caps, judge, language):
                judged += 1
                human = dict((c.name, w) for c, w in wanted[res.pair.key])
                for cap, v_ab, v_ba in zip(res.capabilities, res.ab, res.ba, strict=True):
                    per_cap[cap.name].add(human[cap.name], v_ab, v_ba, min_margin)
        finally:
            await judge.aclose()

    t0 = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - t0
    js = judge.stats.minus(before)
    report = {
        "judge": judge.name,
        "judge_identity": judge.identity,
        "overall_capability": {"name": overall.name, "definition": overall.definition},
        "overall": total.to_dict(),
        "by_source": {k: v.to_dict() for k, v in sorted(overall_by_source.items())},
        "per_capability": {k: v.to_dict() for k, v in sorted(per_cap.items())},
        "speed": {
            "pairs_judged": judged,
            "elapsed_s": round(elapsed, 2),
            "pairs_per_s": round(judged / elapsed, 4) if elapsed > 0 else None,
            "questions_asked": js.asked,
            "questions_cached": js.cached,
            "note": "cached questions cost nothing; rerun with an empty cache for speed",
        },
        "tokens": {"prompt": js.prompt_tokens, "completion": js.completion_tokens, "cost": round(js.cost, 6)},
        "retries": dict(js.retries),
        "command": command,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (out / f"{name}.md").write_text(report_markdown(report), encoding="utf-8")
        logger.info("label-quality report written to %s/%s.{json,md}", out, name)
    return report


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def report_markdown(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [
        f"# Label quality: {report['judge']}",
        "",
        f"Overall preference asked as capability `{report['overall_capability']['name']}`: "
        f"{report['overall_capability']['definition']}.",
        "",
        "| set | pairs | strict kept share | strict agreement (kept) | strict agreement (dropped = ½) "
        "| margin agreement | single-order agreement | position-1 share | order disagreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, t: dict) -> str:
        pb = t["position_bias"]
        return (
            f"| {name} | {t['pairs']} | {_fmt(t['strict']['kept_share'])} | {_fmt(t['strict']['agreement_on_kept'])} "
            f"| {_fmt(t['strict']['agreement_dropped_as_half'])} | {_fmt(t['margin']['agreement'])} "
            f"| {_fmt(t['single_order_agreement'])} | {_fmt(pb['first_position_share'])} "
            f"| {_fmt(pb['order_disagreement'])} |"
        )

    for src, t in report["by_source"].items():
        lines.append(row(src, t))
    lines.append(row("**all**", report["overall"]))
    if report["per_capability"]:
        lines += ["", "Per capability point (human per-aspect labels):", ""]
        lines += [lines[4], lines[5]]
        for cap, t in report["per_capability"].items():
            lines.append(row(cap, t))
    sp = report["speed"]
    lines += [
        "",
        f"Speed: {sp['pairs_judged']} pairs in {sp['elapsed_s']} s = {_fmt(sp['pairs_per_s'])} pairs/s "
        f"({sp['questions_asked']} questions asked, {sp['questions_cached']} from the cache).",
    ]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


FINEGRAINED_ASPECTS = (
    Capability(
        "relevance",
        "stays relevant to the question: no irrelevant, redundant or incoherent content",
        "切题：没有无关、重复或不连贯的内容",
    ),
    Capability(
        "factuality",
        "states only facts that are correct and supported by the given passages",
        "只陈述正确且有给定段落支持的事实",
    ),
    Capability(
        "completeness",
        "gives all the information from the passages that the question needs",
        "给出问题所需的、段落中的全部信息",
    ),
)
"""FineGrainedRLHF's three error categories (Wu et al. 2023) as capability points."""

_FG_ERROR_ASPECT = {
    "Irrelevant": "relevance",
    "Redundant": "relevance",
    "Incoherent": "relevance",
    "Wrong-Grounding": "factuality",
    "Unverifiable": "factuality",
}


def finegrained_aspect_labels(records: Iterable[PreferenceRecord]) -> list[CapabilityLabel]:
    """Per-capability human labels from FineGrainedRLHF's span annotations.

    Annotators marked errors in one prediction per question and wrote a corrected prediction. For every
    aspect of :data:`FINEGRAINED_ASPECTS` in which the original had at least one error (missing information
    counts for ``completeness``), the corrected prediction is the better one. Aspects without errors give no
    label (the correction may still differ). Which of the two is ``response_a`` alternates from question to
    question, so a judge with a position bias cannot score well by it. Records are those of
    ``load_source("finegrained_rlhf/qa_dev")`` (the feedback is in ``meta["feedback"]``).
    """
    out: list[CapabilityLabel] = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        for idx, fb in enumerate(rec.meta.get("feedback") or []):
            if not isinstance(fb, dict) or idx >= len(rec.responses):
                continue
            original, corrected = rec.responses[idx], (fb.get("corrected-prediction") or "").strip()
            if not corrected or corrected == original.strip() or (rec.prompt_key, original) in seen:
                continue
            seen.add((rec.prompt_key, original))
            aspects = {
                _FG_ERROR_ASPECT[e.get("error type")]
                for e in fb.get("errors") or []
                if e.get("error type") in _FG_ERROR_ASPECT
            }
            if fb.get("missing-info"):
                aspects.add("completeness")
            flip = len(seen) % 2 == 0
            a, b = (corrected, original) if flip else (original, corrected)
            for aspect in sorted(aspects):
                out.append(
                    CapabilityLabel(
                        conversation=rec.conversation,
                        response_a=a,
                        response_b=b,
                        capability=aspect,
                        winner="a" if flip else "b",
                        category=rec.category,
                        judge="human:finegrained_rlhf",
                    )
                )
    return out
