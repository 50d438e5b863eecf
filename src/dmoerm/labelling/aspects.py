"""Per-capability (per-aspect) human labels from annotated data, in the schema of the judges' labels.

:func:`finegrained_aspect_labels` turns FineGrainedRLHF's span annotations into labels of its three error
categories (:data:`FINEGRAINED_ASPECTS`); :func:`aspect_score_labels` turns per-response aspect scores
(HelpSteer-style ratings) into pairwise labels. :mod:`dmoerm.labelling.human` maps them onto the taxonomy's
capability points for phase 2; :mod:`dmoerm.labelling.quality` measures judges against them.
"""

from __future__ import annotations

from collections.abc import Iterable

from dmoerm.data import PreferenceRecord
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import Capability

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
