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

:class:`QualityConfig` and :func:`run_quality` are the ``dmoerm label-quality`` command: they sample the bundled
human-labelled sets (:data:`QUALITY_SETS`: PandaLM, LLMBar, FineGrainedRLHF overall preferences and its
per-aspect labels), build the judge with :func:`~dmoerm.labelling.pipeline.make_judge` and write the report.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.judge import CONSISTENCY, Judge, PositionBias, Verdict, combine_orders
from dmoerm.labelling.pipeline import JudgeConfig, LabelPair, iter_pairs, judge_pairs
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

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(pairs) + len(cap_pairs), unit="pair", desc="label-quality", disable=not progress,
        dynamic_ncols=True,
    )  # fmt: skip

    masses: list[float] = []

    def mass(*verdicts: Verdict) -> None:
        for v in verdicts:
            if v.raw.startswith('{"logp"'):
                try:
                    masses.append(float(json.loads(v.raw)["mass"]))
                except (ValueError, KeyError, TypeError):
                    pass

    async def run() -> None:
        nonlocal judged
        try:
            async for res in judge_pairs(pairs, plan_overall, judge, language):
                judged += 1
                bar.update(1)
                v_ab, v_ba = res.ab[0], res.ba[0]
                mass(v_ab, v_ba)
                total.add(res.pair.human, v_ab, v_ba, min_margin)
                overall_by_source[res.pair.source.split("/")[0] or "unknown"].add(
                    res.pair.human, v_ab, v_ba, min_margin
                )
            async for res in judge_pairs(cap_pairs, plan_caps, judge, language):
                judged += 1
                bar.update(1)
                human = dict((c.name, w) for c, w in wanted[res.pair.key])
                for cap, v_ab, v_ba in zip(res.capabilities, res.ab, res.ba, strict=True):
                    mass(v_ab, v_ba)
                    per_cap[cap.name].add(human[cap.name], v_ab, v_ba, min_margin)
        finally:
            await judge.aclose()

    t0 = time.perf_counter()
    try:
        asyncio.run(run())
    finally:
        bar.close()
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
        "answer_label_mass": _mass_summary(masses),
        "retries": dict(js.retries),
        "malformed": js.malformed,
        "failed": js.failed,
        "command": command,
        **(extra or {}),
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
        where = f"{rec.source or 'record'}:{rec.uid or rec.prompt_key}"
        if "feedback" not in rec.meta:
            raise ValueError(
                f"{where}: field 'feedback': missing; aspect labels need FineGrainedRLHF's span annotations "
                f"(load_source('finegrained_rlhf/qa_dev'))"
            )
        for idx, fb in enumerate(rec.meta.get("feedback") or []):
            if not isinstance(fb, dict) or idx >= len(rec.responses):
                continue
            unknown = (
                {e.get("error type") for e in fb.get("errors") or []} - set(_FG_ERROR_ASPECT) - {"Missing"}
            )
            if unknown:
                raise ValueError(
                    f"{where}: field 'feedback[{idx}].errors': unknown error type(s) {sorted(map(str, unknown))}; "
                    f"known: {', '.join(_FG_ERROR_ASPECT)}"
                )
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


def aspect_score_labels(
    records: Iterable[PreferenceRecord], field: str = "aspect_scores", judge: str = "human"
) -> list[CapabilityLabel]:
    """Pairwise capability labels from per-response aspect scores (HelpSteer-style ratings).

    Each record carries ``meta[field]``: one ``{capability: score}`` mapping per response, in response order
    (higher is better). Every pair of responses gives one label per capability scored for both: the higher
    score wins, equal scores give a ``tie`` (phase 2 skips ties as its ranking loss does). Written in the same
    schema as the LLM judges' labels, so phase 2 (``labels.source: file``) takes either unchanged.
    """
    out: list[CapabilityLabel] = []
    for rec in records:
        where = f"{rec.source or 'record'}:{rec.uid or rec.prompt_key}"
        scores = rec.meta.get(field)
        if not isinstance(scores, list) or len(scores) != len(rec.responses):
            raise ValueError(
                f"{where}: field '{field}': expected one mapping of capability scores per response "
                f"({len(rec.responses)}), got {type(scores).__name__ if not isinstance(scores, list) else len(scores)}"
            )
        for i in range(len(rec.responses)):
            for j in range(i + 1, len(rec.responses)):
                for cap in sorted(set(scores[i]) & set(scores[j])):
                    a, b = scores[i][cap], scores[j][cap]
                    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
                        raise ValueError(
                            f"{where}: field '{field}[{i} or {j}].{cap}': scores must be numbers"
                        )
                    out.append(
                        CapabilityLabel(
                            conversation=rec.conversation,
                            response_a=rec.responses[i],
                            response_b=rec.responses[j],
                            capability=cap,
                            winner="a" if a > b else "b" if b > a else "tie",
                            category=rec.category,
                            judge=judge,
                        )
                    )
    return out


# ------------------------------------------------------------------------------------------ the command

QUALITY_SETS = ("pandalm", "llmbar", "finegrained", "finegrained_aspects")
"""Sets with human labels that :func:`run_quality` knows:

* ``pandalm``: PandaLM test set (``pandalm/test``), majority of 3 annotators, overall preference;
* ``llmbar``: LLMBar natural + adversarial (``llmbar``), gold instruction-following label; reported as
  ``llmbar_natural`` and ``llmbar_adversarial``;
* ``finegrained``: FineGrainedRLHF qa-feedback dev (``finegrained_rlhf/qa_dev``), overall preference from the
  annotators' pairwise rankings;
* ``finegrained_aspects``: the same file's span annotations as per-capability labels (relevance, factuality,
  completeness; :func:`finegrained_aspect_labels`), reported per capability point.
"""

_SET_SOURCE = {
    "pandalm": "pandalm/test",
    "llmbar": "llmbar",
    "finegrained": "finegrained_rlhf/qa_dev",
    "finegrained_aspects": "finegrained_rlhf/qa_dev",
}


@dataclass(kw_only=True)
class QualityConfig(JudgeConfig):
    """Configuration of ``dmoerm label-quality`` (and :func:`run_quality`): the judge options of
    :class:`~dmoerm.labelling.pipeline.JudgeConfig` plus which human-labelled sets to sample and where the
    report goes. Every field is validated on creation (``ValueError`` naming the field and the fix)."""

    out_dir: str
    """Folder for ``<name>.json`` and ``<name>.md`` (and the judge cache, unless ``cache`` is set)."""
    sets: list[str] = field(default_factory=lambda: list(QUALITY_SETS))
    """Which sets to judge: any of ``pandalm``, ``llmbar``, ``finegrained``, ``finegrained_aspects``."""
    limit: int | None = 50
    """Pairs sampled per set at most (seeded, without human ties); None for every pair."""
    seed: int = 0
    """Seed of the sample."""
    data_dir: str | None = None
    """Folder of the bundled data; None for the default (``$DMOERM_DATA_DIR`` or ``../shared/data``)."""
    name: str = "label_quality"
    """File stem of the report."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        if not self.out_dir or not str(self.out_dir).strip():
            bad("out_dir", "empty; give the folder for the report")
        if isinstance(self.sets, str):
            self.sets = [x.strip() for x in self.sets.split(",") if x.strip()]
        if not self.sets:
            bad("sets", f"no set; name at least one of {', '.join(QUALITY_SETS)}")
        for s in self.sets:
            if s not in QUALITY_SETS:
                bad("sets", f"{s!r} is not one of {', '.join(QUALITY_SETS)}")
        if len(set(self.sets)) != len(self.sets):
            bad("sets", f"{self.sets} names a set twice; name each once")
        if self.limit is not None and self.limit < 1:
            bad("limit", f"{self.limit} must be >= 1 (or None for every pair)")
        if self.data_dir is not None and not str(self.data_dir).strip():
            bad("data_dir", "empty; give the data folder or leave it unset for the default")
        if not self.name or any(c in self.name for c in "/\\\0") or self.name in (".", ".."):
            bad("name", f"{self.name!r} must be a plain file stem such as label_quality")
        super().__post_init__()

    def cache_path(self) -> str:
        """``cache``, or ``<out_dir>/judge_cache.sqlite``."""
        return self.cache or str(Path(self.out_dir) / "judge_cache.sqlite")


def _sample(items: list, limit: int | None, rng: random.Random) -> list:
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), limit))]


def _maybe_swap(pair: LabelPair, rng: random.Random) -> LabelPair:
    if rng.random() < 0.5:
        return pair
    human = {"a": "b", "b": "a"}.get(pair.human or "", pair.human)
    return replace(pair, response_a=pair.response_b, response_b=pair.response_a, human=human)


def _llmbar_source(source: str) -> str:
    return "llmbar_natural" if source.endswith("natural") else "llmbar_adversarial"


def load_quality_sets(
    sets: Sequence[str],
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[list[LabelPair], list[CapabilityLabel], dict]:
    """The pairs (overall preference) and per-capability human labels of ``sets`` (see :data:`QUALITY_SETS`),
    ``limit`` pairs per set sampled with ``seed`` among pairs without a human tie.

    The bundled loaders put the preferred response first; which response of a sampled pair becomes
    ``response_a`` is drawn at random (seeded), so that the single-order agreement is not inflated by a judge
    that always prefers position 1.

    Returns (pairs, human capability labels, {set: {"available": n, "sampled": n}}).
    """
    from dmoerm.data import load_source

    rng = random.Random(seed)
    swap_rng = random.Random(seed + 7919)  # separate stream: the sample does not depend on the swaps
    loaded: dict[str, list[PreferenceRecord]] = {}
    pairs: list[LabelPair] = []
    labels: list[CapabilityLabel] = []
    sizes: dict = {}
    for name in sets:
        if name not in QUALITY_SETS:
            raise ValueError(f"sets: {name!r} is not one of {', '.join(QUALITY_SETS)}")
        src = _SET_SOURCE[name]
        if src not in loaded:
            loaded[src] = list(load_source(src, data_dir))
        records = loaded[src]
        if name == "finegrained_aspects":
            groups: dict[tuple, list[CapabilityLabel]] = defaultdict(list)
            for lab in finegrained_aspect_labels(records):
                groups[(lab.conversation, lab.response_a, lab.response_b)].append(lab)
            chosen = _sample(list(groups), limit, rng)
            labels += [lab for key in chosen for lab in groups[key]]
            sizes[name] = {"available": len(groups), "sampled": len(chosen), "labels": len(labels)}
            continue
        candidates = [p for p in iter_pairs(records) if p.human in ("a", "b")]
        if name == "llmbar":
            candidates = [replace(p, source=_llmbar_source(p.source)) for p in candidates]
        chosen = [_maybe_swap(p, swap_rng) for p in _sample(candidates, limit, rng)]
        pairs += chosen
        sizes[name] = {"available": len(candidates), "sampled": len(chosen)}
    return pairs, labels, sizes


def run_quality(config: QualityConfig) -> dict:
    """The ``dmoerm label-quality`` command: sample the human-labelled sets, judge them with the judge that
    :func:`~dmoerm.labelling.pipeline.make_judge` builds from ``config``, write ``<out_dir>/<name>.json`` and
    ``.md`` (:func:`quality_report`) and return the report.

    The judge cache (``<out_dir>/judge_cache.sqlite`` by default) makes a rerun free; the speed figures are
    then those of the cache, so delete it (or set ``cache``) to measure the judge.
    """
    if not isinstance(config, QualityConfig):
        raise TypeError(f"config: expected a QualityConfig, got {type(config).__name__}")
    from dmoerm.labelling.pipeline import make_judge

    pairs, human, sizes = load_quality_sets(config.sets, config.limit, config.seed, config.data_dir)
    logger.info(
        "label quality on %s",
        ", ".join(f"{k}: {v['sampled']} of {v['available']} pairs" for k, v in sizes.items()),
    )
    judge = make_judge(config)
    public = asdict(config)
    return quality_report(
        pairs,
        judge,
        config.out_dir,
        human_labels=human,
        capabilities=FINEGRAINED_ASPECTS,
        language=config.language,
        min_margin=config.min_margin,
        name=config.name,
        progress=config.progress,
        extra={"sets": sizes, "config": public},
    )


# ------------------------------------------------------------------------------------ the judge as evaluator


def judge_rewards(
    judge: Judge,
    records: Sequence[PreferenceRecord],
    *,
    consistency: str = "auto",
    min_margin: float = 0.0,
    language: str = "auto",
    progress: bool = True,
) -> list[list[float]]:
    """An LLM judge as a zero-shot reward: per response, the sum over its record's pairs of the judge's
    both-orders verdict on :data:`OVERALL` (issue 5's baseline (d)).

    With logit margins (``consistency`` ``margin``, or ``auto`` when the judge has them) a pair adds
    ``s = (margin_ab - margin_ba) / 2`` (the log-odds that the first response is better with a constant position
    bias cancelled; ``|s| < min_margin`` adds 0) to the first response and ``-s`` to the second; otherwise the
    paper's strict rule adds +1 / -1 when both orders name the same winner and 0 when they do not (a tie,
    which the metrics exclude and count). Returns ``rewards[i][j]`` for ``records[i].responses[j]``.
    """
    from tqdm.auto import tqdm

    rewards = [[0.0] * len(rec.responses) for rec in records]
    pairs = [
        LabelPair(
            rec.conversation, rec.responses[i], rec.responses[j], rec.category, rec.source, f"{k}:{i}:{j}"
        )
        for k, rec in enumerate(records)
        for i in range(len(rec.responses))
        for j in range(i + 1, len(rec.responses))
    ]
    bar = tqdm(total=len(pairs), unit="pair", desc="judge", disable=not progress, dynamic_ncols=True)

    async def run() -> None:
        try:
            async for res in judge_pairs(pairs, lambda pair: (None, (OVERALL,)), judge, language):
                bar.update(1)
                k, i, j = (int(x) for x in res.pair.uid.split(":"))
                v_ab, v_ba = res.ab[0], res.ba[0]
                has_margins = v_ab.margin is not None and v_ba.margin is not None
                if consistency == "margin" or (consistency == "auto" and has_margins):
                    d = combine_orders(v_ab, v_ba, "margin", min_margin)
                    s = (v_ab.margin - v_ba.margin) / 2.0 if d.winner is not None else 0.0
                else:
                    d = combine_orders(v_ab, v_ba, "strict")
                    s = {"a": 1.0, "b": -1.0}.get(d.winner or "", 0.0)
                rewards[k][i] += s
                rewards[k][j] -= s
        finally:
            await judge.aclose()

    try:
        asyncio.run(run())
    finally:
        bar.close()
    return rewards


@dataclass
class JudgeEvalConfig(JudgeConfig):
    """``dmoerm eval-judge``: an LLM judge's agreement with human labels, by the same metrics and report as
    ``dmoerm eval`` (the judge options of :class:`~dmoerm.labelling.pipeline.JudgeConfig` plus the data)."""

    data: list[str] = field(default_factory=list)
    """Bundled source names or JSONL files in the documented schema (e.g. a run's ``splits/test.jsonl``)."""
    out: str | None = None
    """Folder for ``eval.json`` and ``eval.md`` (and the judge cache, unless ``cache`` is set)."""
    taxonomy: str = "default"
    """Taxonomy that maps the data's category labels onto categories (per-category rows)."""
    limit: int | None = None
    """Records per data source at most (the first ones); None for all."""
    n_resamples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    data_dir: str | None = None
    """Folder of the bundled data; None uses ``$DMOERM_DATA_DIR`` or ``../shared/data``."""
    system: str | None = None
    """Row label in comparison tables; None uses ``LLM judge (<judge name>)``."""
    consistency: str = "auto"
    """How the two orders combine: ``margin`` (logit margins), ``strict`` (the paper's agreement rule) or
    ``auto`` (margins when the judge has them)."""

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency: {self.consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("data: name at least one source (e.g. rmb/pairwise) or JSONL file")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: {self.limit} must be >= 1, or None for all records")
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples: {self.n_resamples} must be >= 0 (0 skips the intervals)")
        super().__post_init__()

    def cache_path(self) -> str:
        """``cache``, else ``<out>/judge_cache.sqlite``, else an in-memory cache."""
        if self.cache:
            return self.cache
        return str(Path(self.out) / "judge_cache.sqlite") if self.out else ":memory:"


def run_judge_eval(config: JudgeEvalConfig):
    """Load the data, ask the judge about every pair in both orders, compute the metrics of ``dmoerm eval``
    (:func:`~dmoerm.evaluation.compute_metrics`), write ``eval.json``/``eval.md`` to ``config.out``."""
    from dmoerm.evaluation import Throughput, compute_metrics, load_eval_records, write_eval
    from dmoerm.labelling.pipeline import make_judge
    from dmoerm.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(config.taxonomy)
    records = load_eval_records(config.data, taxonomy, config.data_dir, limit=config.limit)
    judge = make_judge(config)
    t0 = time.perf_counter()
    rewards = judge_rewards(
        judge,
        records,
        consistency=config.consistency,
        min_margin=config.min_margin,
        language=config.language,
        progress=config.progress,
    )
    seconds = time.perf_counter() - t0
    result = compute_metrics(
        rewards, records, n_resamples=config.n_resamples, system=config.system or f"LLM judge ({judge.name})"
    )
    n_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in records)
    result.throughput = Throughput(
        seconds=seconds,
        responses_per_second=sum(len(r.responses) for r in records) / max(seconds, 1e-9),
        pairs_per_second=n_pairs / max(seconds, 1e-9),
        batch_size=getattr(judge, "batch_size", 1),
    )
    result.meta = {"judge": judge.identity, "data": list(config.data), "consistency": config.consistency}
    if config.out:
        write_eval(result, config.out)
    a = result.overall.agreement
    logger.info(
        "judge %s: agreement %.4f [%.4f, %.4f] on %d pairs", judge.name, a.value, a.ci_low, a.ci_high, a.n
    )
    return result
