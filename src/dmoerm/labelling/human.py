"""Phase-2 labels from bundled human-labelled sets, the label gate, and each expert's held-back agreement.

A capability point's ``label_source`` in the taxonomy (:data:`dmoerm.taxonomy.LABEL_SOURCES`) is ``judge`` or
a bundled human set mapped onto it:

* ``finegrained/relevance``, ``finegrained/factuality``, ``finegrained/completeness``: FineGrainedRLHF QA
  feedback (Wu et al. 2023); the annotator's corrected answer beats the original on each aspect in which the
  original had an error (:func:`dmoerm.labelling.aspects.finegrained_aspect_labels`);
* ``llmbar``: LLMBar natural + adversarial, the gold instruction-following label (output 1 or 2);
* ``hh_rlhf/harmless``: Anthropic hh-rlhf harmless-base test, the human "more harmless" choice.

The pipeline calls, per category, :func:`plan_category_labels` (or its parts: :func:`human_capability_labels`,
:func:`capability_label_plan`, :func:`split_held_back`, :func:`gate_experts`), trains an expert for each
capability in ``plan.train`` and measures it with :func:`expert_agreement` on ``plan.held_back``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from dmoerm.data import PreferenceRecord, conversation_key, default_data_dir, load_source
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import JUDGE, LABEL_SOURCES, Taxonomy

logger = logging.getLogger(__name__)

HUMAN_SOURCES: dict[str, str] = {
    "finegrained/relevance": "finegrained_rlhf/qa_dev",
    "finegrained/factuality": "finegrained_rlhf/qa_dev",
    "finegrained/completeness": "finegrained_rlhf/qa_dev",
    "llmbar": "llmbar",
    "hh_rlhf/harmless": "hh_rlhf/harmless_base_test",
}
"""Each human label source of :data:`~dmoerm.taxonomy.LABEL_SOURCES` -> the bundled data it reads
(a :func:`dmoerm.data.load_source` name)."""

assert set(HUMAN_SOURCES) == set(LABEL_SOURCES) - {JUDGE}, "every taxonomy label source needs a reader here"


def _excluded(record: PreferenceRecord, exclude: Collection) -> bool:
    """Whether a record's prompt is held out; ``exclude`` holds pipeline keys (tuples) or record hashes."""
    return bool(exclude) and (
        conversation_key(record.conversation) in exclude or record.prompt_key in exclude
    )


def _rank(seed: int, *parts: str) -> str:
    """A seeded, order-free sort key: the same item ranks the same whatever else is in the list."""
    h = hashlib.sha1(str(seed).encode())
    for p in parts:
        h.update(b"\x1f" + p.encode("utf-8"))
    return h.hexdigest()


@lru_cache(maxsize=8)
def _records(data_source: str, data_dir: str) -> tuple[PreferenceRecord, ...]:
    """A bundled source's records, read once per process (several capabilities may share one source)."""
    return tuple(load_source(data_source, data_dir))


def _better_worse(
    source: str, records: Sequence[PreferenceRecord]
) -> list[tuple[PreferenceRecord, str, str]]:
    """(record, better response, worse response) per human judgement of ``source``."""
    if source.startswith("finegrained/"):
        from dmoerm.labelling.aspects import finegrained_aspect_labels

        aspect = source.split("/", 1)[1]
        by_prompt = {r.conversation: r for r in records}
        out = []
        for lab in finegrained_aspect_labels(records):
            if lab.capability == aspect:
                a, b = lab.response_a, lab.response_b
                out.append((by_prompt[lab.conversation], *((a, b) if lab.winner == "a" else (b, a))))
        return out
    # llmbar and hh-rlhf: two responses per record, the human's choice ranked 0.
    return [(r, r.chosen, r.rejected) for r in records if not r.is_tie]


def human_capability_labels(
    source: str,
    category: str | None,
    capability: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    exclude_prompts: Collection = (),
) -> list[CapabilityLabel]:
    """Labels of ``capability`` (of ``category``) from the bundled human set ``source`` (:data:`HUMAN_SOURCES`).

    Every human judgement of the set becomes one untied label (confidence 1, ``judge = "human:<source>"``,
    ``raw = "<data source>:<uid>"``). Deterministic: which response is ``response_a`` and which labels a
    ``limit`` keeps are drawn from a hash of ``seed`` and the pair itself, so the order of the file, the
    exclusions and the limit change nothing else (a larger limit keeps a superset). ``exclude_prompts`` holds
    prompt keys that must not be trained on (the pipeline's phase-3, dev and test prompts), as pipeline keys
    ``((role, content), ...)`` or :attr:`~dmoerm.data.PreferenceRecord.prompt_key` hashes.
    """
    if source not in HUMAN_SOURCES:
        raise ValueError(
            f"source: {source!r} is not a human label source; use one of {', '.join(HUMAN_SOURCES)} "
            f"({JUDGE!r} labels come from the judge, `dmoerm label`)"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: {limit!r}; use a positive integer or None")
    exclude = exclude_prompts if isinstance(exclude_prompts, (set, frozenset, dict)) else set(exclude_prompts)
    data_source = HUMAN_SOURCES[source]
    records = _records(data_source, str(Path(data_dir) if data_dir is not None else default_data_dir()))
    found = _better_worse(source, records)
    kept = [t for t in found if not _excluded(t[0], exclude)]
    n_excluded = len(found) - len(kept)
    kept.sort(key=lambda t: _rank(seed, t[0].prompt_key, t[1], t[2]))
    if limit is not None:
        kept = kept[:limit]
    labels = []
    for rec, better, worse in kept:
        flip = int(_rank(seed + 1, rec.prompt_key, better, worse)[-1], 16) % 2 == 1
        a, b = (worse, better) if flip else (better, worse)
        labels.append(
            CapabilityLabel(
                conversation=rec.conversation,
                response_a=a,
                response_b=b,
                capability=capability,
                winner="b" if flip else "a",
                category=category,
                judge=f"human:{source}",
                raw=f"{rec.source}:{rec.uid}",
            )
        )
    logger.info(
        "%s/%s: %d human labels from %s (%d judgements, %d on held-out prompts excluded%s)",
        category,
        capability,
        len(labels),
        source,
        len(found),
        n_excluded,
        f", limit {limit}" if limit is not None else "",
    )
    return labels


def split_held_back(
    labels: Sequence[CapabilityLabel], share: float, seed: int = 0
) -> tuple[list[CapabilityLabel], list[CapabilityLabel]]:
    """(train, held back): ``round(share * prompts)`` of the labels' prompts held back, prompt-disjoint.

    The prompts are ordered by a seeded hash, so the split does not depend on the labels' order; at least one
    prompt is held back when ``share > 0`` and there are any labels. The held-back labels measure the expert
    trained on the rest (:func:`expert_agreement`).
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share: {share!r}; use a fraction in [0, 1)")
    prompts = sorted(
        {conversation_key(lab.conversation) for lab in labels}, key=lambda k: _rank(seed, repr(k))
    )
    n_hold = max(1, round(share * len(prompts))) if share > 0 and prompts else 0
    held = set(prompts[:n_hold])
    train = [lab for lab in labels if conversation_key(lab.conversation) not in held]
    back = [lab for lab in labels if conversation_key(lab.conversation) in held]
    return train, back


def judge_capabilities(taxonomy: Taxonomy, category: str) -> tuple[str, ...]:
    """The capability points of ``category`` whose labels come from the judge (the ones to send to it)."""
    return tuple(n for n, s in taxonomy.category(category).label_sources().items() if s == JUDGE)


def capability_label_plan(
    taxonomy: Taxonomy,
    category: str,
    judge_labels: Iterable[CapabilityLabel],
    human_labels: Mapping[str, Sequence[CapabilityLabel]],
) -> dict[str, list[CapabilityLabel]]:
    """Each capability point of ``category`` -> its labels, from the source the taxonomy names for it.

    A ``judge`` capability takes the judge's labels of that capability (labels of another category are
    ignored; category None counts as this one); any other takes ``human_labels[capability]`` (see
    :func:`human_capability_labels`), and judge labels for it are ignored. Every capability point is a key,
    in taxonomy order, possibly with no labels.
    """
    sources = taxonomy.category(category).label_sources()
    stray = [c for c in human_labels if sources.get(c, JUDGE) == JUDGE]
    if stray:
        raise ValueError(
            f"human_labels: capability point(s) {', '.join(stray)} of {category!r} have label_source "
            f"{JUDGE!r} (or do not exist); human labels go only to capability points that name a human source"
        )
    by_cap: dict[str, list[CapabilityLabel]] = {c: [] for c in sources}
    ignored = 0
    for lab in judge_labels:
        if lab.category not in (category, None) or lab.capability not in sources:
            continue
        if sources[lab.capability] == JUDGE:
            by_cap[lab.capability].append(lab)
        else:
            ignored += 1
    for cap, labs in human_labels.items():
        by_cap[cap] = list(labs)
    if ignored:
        logger.info(
            "%s: ignored %d judge labels of capability points with a human label source", category, ignored
        )
    return by_cap


def gate_experts(
    labels_by_capability: Mapping[str, Sequence[CapabilityLabel]], min_labels: int
) -> tuple[dict[str, list[CapabilityLabel]], dict[str, int]]:
    """(kept, dropped): a capability keeps its untied labels when it has at least ``min_labels`` of them
    (an expert is trained); otherwise it is dropped with its count (no expert, left out of the aggregator).

    Ties carry no ranking (phase 2's loss skips them), so they count for nothing and are not returned.
    """
    if isinstance(min_labels, bool) or not isinstance(min_labels, int) or min_labels < 1:
        raise ValueError(f"min_labels: {min_labels!r}; use a positive integer")
    kept: dict[str, list[CapabilityLabel]] = {}
    dropped: dict[str, int] = {}
    for cap, labs in labels_by_capability.items():
        untied = [lab for lab in labs if lab.winner in ("a", "b")]
        if len(untied) >= min_labels:
            kept[cap] = untied
        else:
            dropped[cap] = len(untied)
            logger.warning("%s: %d kept labels (< %d): no expert", cap, len(untied), min_labels)
    return kept, dropped


@dataclass
class LabelPlan:
    """One category's phase-2 labels after the label sources, the held-back split and the gate."""

    category: str
    sources: dict[str, str]
    """Capability point -> its label source (``judge`` or a human set), in taxonomy order."""
    train: dict[str, list[CapabilityLabel]] = field(default_factory=dict)
    """Capability points that get an expert -> the untied labels it trains on (at least ``min_labels``)."""
    held_back: dict[str, list[CapabilityLabel]] = field(default_factory=dict)
    """Capability point -> labels on prompts kept out of its training, for :func:`expert_agreement`."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Capability points without an expert -> how many untied training labels they had (< ``min_labels``)."""

    @property
    def experts(self) -> list[str]:
        """The capability points that get an expert, in taxonomy order."""
        return [c for c in self.sources if c in self.train]

    def to_dict(self) -> dict:
        """Per capability point: its source, training and held-back label counts, and whether it has an
        expert (the run report's table)."""
        return {
            cap: {
                "source": src,
                "labels": len(self.train[cap]) if cap in self.train else self.dropped.get(cap, 0),
                "held_back": len(self.held_back.get(cap, [])),
                "expert": cap in self.train,
            }
            for cap, src in self.sources.items()
        }


def plan_category_labels(
    taxonomy: Taxonomy,
    category: str,
    judge_labels: Iterable[CapabilityLabel],
    *,
    min_labels: int,
    held_back_share: float = 0.0,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    exclude_prompts: Collection = (),
) -> LabelPlan:
    """One category's phase-2 plan: labels per capability point from its taxonomy source
    (:func:`human_capability_labels` for human sources, ``judge_labels`` otherwise, joined by
    :func:`capability_label_plan`), ``held_back_share`` of each capability's prompts held back
    (:func:`split_held_back`), then :func:`gate_experts` on the rest.

    ``limit`` caps each human source's labels per capability point; ``exclude_prompts`` (the run's phase-3,
    dev and test prompts) keeps human labels off prompts the run holds out. Judge labels are expected to be
    on phase-1 prompts already.
    """
    sources = taxonomy.category(category).label_sources()
    human = {
        cap: human_capability_labels(src, category, cap, data_dir, limit, seed, exclude_prompts)
        for cap, src in sources.items()
        if src != JUDGE
    }
    by_cap = capability_label_plan(taxonomy, category, judge_labels, human)
    plan = LabelPlan(category, sources)
    to_gate: dict[str, list[CapabilityLabel]] = {}
    for cap, labs in by_cap.items():
        to_gate[cap], back = split_held_back(labs, held_back_share, seed) if held_back_share else (labs, [])
        if back:
            plan.held_back[cap] = back
    plan.train, plan.dropped = gate_experts(to_gate, min_labels)
    return plan


def expert_agreement(
    model, expert_name: str, held_back_labels: Sequence[CapabilityLabel], cache, batch_size: int = 16
) -> dict:
    """How often expert ``expert_name`` (an adapter of ``model.bank``, e.g. ``objective_qa__relevance``)
    ranks a held-back label's two responses as the label does: ``{"n", "agreement"}`` (ties skipped;
    agreement None when n is 0). Scored by the expert itself, with no router, reading trunk states from
    ``cache`` (a :class:`dmoerm.training.trunk_cache.TrunkCache`)."""
    from dmoerm.encoding import encode
    from dmoerm.scoring import expert_rewards, in_order

    bank = model.bank
    if expert_name not in bank.heads:
        raise KeyError(f"expert_name: no expert {expert_name!r} in the model; it has {', '.join(bank.heads)}")
    labels = [lab for lab in held_back_labels if lab.winner in ("a", "b")]
    tok, n = model.tokenizer, model.max_length
    inputs = [encode(tok, lab.conversation, r, n) for lab in labels for r in (lab.response_a, lab.response_b)]
    rewards = expert_rewards(
        bank, expert_name, inputs, cache, batches=in_order(len(inputs), batch_size)
    )  # [2L]
    agree = sum(
        (bool(rewards[2 * i] > rewards[2 * i + 1])) == (lab.winner == "a") for i, lab in enumerate(labels)
    )
    return {"n": len(labels), "agreement": agree / len(labels) if labels else None}
