"""Per-capability label sources: the taxonomy field, the bundled human sets, held-out exclusion, the split,
the label gate and each expert's agreement with held-back labels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from dmoerm.data import Message
from dmoerm.labelling.human import (
    HUMAN_SOURCES,
    LabelPlan,
    capability_label_plan,
    conversation_key,
    expert_agreement,
    gate_experts,
    human_capability_labels,
    judge_capabilities,
    plan_category_labels,
    split_held_back,
)
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.taxonomy import LABEL_SOURCES, Capability, Category, Taxonomy, load_taxonomy, save_taxonomy


def raw_line(data_dir: Path, file: str, lineno: int) -> dict:
    """Line ``lineno`` (1-based) of a bundled file, read without dmoerm's loaders."""
    with gzip.open(data_dir / file, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return json.loads(line)
    raise AssertionError(f"{file} has no line {lineno}")


def winner_text(lab: CapabilityLabel) -> str:
    return lab.response_a if lab.winner == "a" else lab.response_b


def loser_text(lab: CapabilityLabel) -> str:
    return lab.response_b if lab.winner == "a" else lab.response_a


def lab(prompt: str, cap: str, winner: str = "a", category: str | None = "qa") -> CapabilityLabel:
    return CapabilityLabel(
        (Message("user", prompt),), f"{prompt} one", f"{prompt} two", cap, winner, 1.0, category
    )


# ---------------------------------------------------------------------------------------------------------------
# The taxonomy field


def taxonomy_dict(source: str | None) -> dict:
    cap = {"name": "accuracy", "definition": "is right"}
    if source is not None:
        cap["label_source"] = source
    return {"name": "t", "categories": [{"name": "qa", "description": "questions", "capabilities": [cap]}]}


def test_label_source_defaults_to_judge_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(taxonomy_dict(None)))
    assert load_taxonomy(path).category("qa").capability("accuracy").label_source == "judge"
    path.write_text(yaml.safe_dump(taxonomy_dict("finegrained/factuality")))
    t = load_taxonomy(path)
    assert t.category("qa").label_sources() == {"accuracy": "finegrained/factuality"}
    for name in ("back.yaml", "back.json"):
        save_taxonomy(t, tmp_path / name)
        assert load_taxonomy(tmp_path / name).category("qa").capability("accuracy").label_source == (
            "finegrained/factuality"
        )
    # The default is not written out, so files without the field stay as they were.
    assert "label_source" not in Capability("a", "b").to_dict()


def test_unknown_label_source_names_file_category_capability_and_known_sources(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(taxonomy_dict("finegrained/fluency")))
    pattern = (
        r"t\.yaml: categories\[0\]\.capabilities\[0\] \(category 'qa', capability 'accuracy'\): label_source "
        r"'finegrained/fluency' is not a known label source; use one of judge, finegrained/relevance, "
        r"finegrained/factuality, finegrained/completeness, llmbar, hh_rlhf/harmless"
    )
    with pytest.raises(ValueError, match=pattern):
        load_taxonomy(path)
    with pytest.raises(ValueError, match=r"capability 'a': label_source 'x' is not a known label source"):
        Capability("a", "b", label_source="x")


def test_default_preset_label_sources() -> None:
    t = load_taxonomy("default")
    human = {(c.name, n): s for c in t.categories for n, s in c.label_sources().items() if s != "judge"}
    # LLMBar fits the instruction-following points but stays an out-of-distribution test set: judge there.
    assert human == {
        ("objective_qa", "correctness"): "finegrained/factuality",
        ("objective_qa", "completeness"): "finegrained/completeness",
        ("objective_qa", "relevance"): "finegrained/relevance",
        ("safety", "harm_avoidance"): "hh_rlhf/harmless",
    }
    assert judge_capabilities(t, "objective_qa") == ("clarity", "objectivity")
    assert set(HUMAN_SOURCES) == set(LABEL_SOURCES) - {"judge"}


# ---------------------------------------------------------------------------------------------------------------
# Human sources against the raw files


def test_finegrained_aspects_winner_is_the_correction(data_dir: Path) -> None:
    # Line 2: "Where does drag me to hell take place?": Irrelevant + Redundant errors and missing information,
    # no factual error -> relevance and completeness labels, none for factuality.
    raw = raw_line(data_dir, "finegrained_rlhf/qa_dev_feedback.jsonl.gz", 2)
    assert {e["error type"] for e in raw["feedback"]["errors"]} == {"Irrelevant", "Redundant"}
    question = raw["question"]
    corrected, original = raw["feedback"]["corrected-prediction"].strip(), raw["prediction 1"]
    for source, expected in (
        ("finegrained/relevance", 1),
        ("finegrained/completeness", 1),
        ("finegrained/factuality", 0),
    ):
        labels = human_capability_labels(source, "objective_qa", "x", data_dir)
        mine = [x for x in labels if x.conversation[0].content.endswith("Question: " + question.strip())]
        assert len(mine) == expected, source
        for x in mine:
            assert (winner_text(x), loser_text(x)) == (corrected, original)
            assert (x.category, x.capability, x.judge) == ("objective_qa", "x", f"human:{source}")


def test_llmbar_winner_is_the_gold_output(data_dir: Path) -> None:
    labels = human_capability_labels("llmbar", "rewriting", "instruction_compliance", data_dir)
    assert len(labels) == 416  # natural 99 + adversarial 317
    by_raw = {x.raw: x for x in labels}
    for subset in ("natural", "adversarial_neighbor", "adversarial_manual"):
        raw = raw_line(data_dir, f"llmbar/{subset}.jsonl.gz", 1)
        x = by_raw[f"llmbar/{subset}:{subset}-1"]
        assert x.conversation == (Message("user", raw["input"]),)
        gold, other = (
            (raw["output_1"], raw["output_2"]) if raw["label"] == 1 else (raw["output_2"], raw["output_1"])
        )
        assert (winner_text(x), loser_text(x)) == (gold, other)
    # Which response is response_a is balanced, so a position bias cannot score.
    assert 0.4 < sum(x.winner == "a" for x in labels) / len(labels) < 0.6


def test_hh_rlhf_winner_is_the_human_choice(data_dir: Path) -> None:
    labels = human_capability_labels("hh_rlhf/harmless", "safety", "harm_avoidance", data_dir)
    x = next(x for x in labels if x.raw == "hh_rlhf/harmless_base_test:1")
    raw = raw_line(data_dir, "hh_rlhf/harmless_base_test.jsonl.gz", 1)
    marker = "\n\nAssistant:"
    assert winner_text(x) == raw["chosen"][raw["chosen"].rindex(marker) + len(marker) :].strip()
    assert loser_text(x) == raw["rejected"][raw["rejected"].rindex(marker) + len(marker) :].strip()
    assert x.conversation[-1] == Message("user", "okay some of these do not have anything to do with pens")


def test_held_out_prompts_are_excluded_and_nothing_else_changes(data_dir: Path) -> None:
    full = human_capability_labels("llmbar", "roleplay", "instruction_following", data_dir)
    held = {conversation_key(x.conversation) for x in full[:10]}
    kept = human_capability_labels(
        "llmbar", "roleplay", "instruction_following", data_dir, exclude_prompts=held
    )
    assert not any(conversation_key(x.conversation) in held for x in kept)
    assert kept == [x for x in full if conversation_key(x.conversation) not in held]
    # The records' own prompt hashes work too.
    from dmoerm.data import load_source

    hashes = {r.prompt_key for r in load_source("llmbar/natural", data_dir)}
    no_natural = human_capability_labels("llmbar", "c", "x", data_dir, exclude_prompts=hashes)
    assert len(no_natural) == 416 - 99 and not any(x.raw.startswith("llmbar/natural:") for x in no_natural)


def test_deterministic_and_limits_nest(data_dir: Path) -> None:
    a = human_capability_labels("hh_rlhf/harmless", "safety", "harm_avoidance", data_dir, limit=40, seed=3)
    assert a == human_capability_labels(
        "hh_rlhf/harmless", "safety", "harm_avoidance", data_dir, limit=40, seed=3
    )
    b = human_capability_labels("hh_rlhf/harmless", "safety", "harm_avoidance", data_dir, limit=80, seed=3)
    assert len(a) == 40 and a == b[:40]
    other = human_capability_labels(
        "hh_rlhf/harmless", "safety", "harm_avoidance", data_dir, limit=40, seed=4
    )
    assert {x.raw for x in other} != {x.raw for x in a}
    with pytest.raises(ValueError, match=r"source: 'judge' is not a human label source.*llmbar"):
        human_capability_labels("judge", "safety", "harm_avoidance", data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Split, plan and gate


def test_split_held_back_is_prompt_disjoint_and_order_free() -> None:
    labels = [lab(f"p{i}", cap) for i in range(20) for cap in ("x", "y")]
    train, back = split_held_back(labels, 0.25, seed=1)
    back_prompts = {conversation_key(x.conversation) for x in back}
    assert len(back_prompts) == 5 and len(back) == 10 and len(train) == 30
    assert not back_prompts & {conversation_key(x.conversation) for x in train}
    assert split_held_back(labels[::-1], 0.25, seed=1)[1] == back[::-1]
    assert split_held_back(labels[:2], 0.1)[1] == labels[:2]  # one prompt: held back, nothing to train on
    assert split_held_back(labels, 0.0) == (labels, [])
    with pytest.raises(ValueError, match=r"share: 1\.0"):
        split_held_back(labels, 1.0)


def test_gate_drops_a_capability_with_too_few_labels() -> None:
    many = [lab(f"p{i}", "x") for i in range(5)]
    few = [lab("q1", "y"), lab("q2", "y", "b"), lab("q3", "y", "tie"), lab("q4", "y", "tie")]
    kept, dropped = gate_experts({"x": many, "y": few, "z": []}, min_labels=3)
    assert kept == {"x": many} and dropped == {"y": 2, "z": 0}  # ties count for nothing
    kept, dropped = gate_experts({"y": few}, min_labels=2)
    assert kept == {"y": few[:2]} and dropped == {}
    with pytest.raises(ValueError, match="min_labels: 0"):
        gate_experts({}, 0)


def test_capability_label_plan_takes_each_capability_from_its_source() -> None:
    taxonomy = Taxonomy(
        "t",
        (
            Category(
                "qa",
                "questions",
                (
                    Capability("accuracy", "right", label_source="finegrained/factuality"),
                    Capability("tone", "kind"),
                ),
            ),
        ),
    )
    judge = [
        lab("p1", "accuracy"),
        lab("p2", "tone"),
        lab("p3", "tone", category=None),
        lab("p4", "tone", category="x"),
    ]
    human = [lab("h1", "accuracy", "b")]
    plan = capability_label_plan(taxonomy, "qa", judge, {"accuracy": human})
    assert plan == {"accuracy": human, "tone": judge[1:3]}
    with pytest.raises(
        ValueError, match=r"human_labels: capability point\(s\) tone of 'qa' have label_source 'judge'"
    ):
        capability_label_plan(taxonomy, "qa", judge, {"tone": human})


def test_plan_category_labels_gates_and_holds_back(data_dir: Path) -> None:
    taxonomy = Taxonomy(
        "t",
        (
            Category(
                "writing",
                "write",
                (Capability("follows", "obeys", label_source="llmbar"), Capability("style", "nice")),
            ),
        ),
    )
    judge = [lab(f"j{i}", "style", category="writing") for i in range(3)]
    plan = plan_category_labels(
        taxonomy, "writing", judge, min_labels=4, held_back_share=0.2, limit=50, data_dir=data_dir
    )
    assert isinstance(plan, LabelPlan) and plan.experts == ["follows"]
    assert len(plan.train["follows"]) == 40 and len(plan.held_back["follows"]) == 10
    assert plan.dropped == {"style": 2}  # 3 judge labels, one prompt held back, 2 < 4
    assert plan.to_dict()["follows"] == {"source": "llmbar", "labels": 40, "held_back": 10, "expert": True}
    assert plan.to_dict()["style"] == {"source": "judge", "labels": 2, "held_back": 1, "expert": False}


# ---------------------------------------------------------------------------------------------------------------
# Expert agreement


def test_expert_agreement_scores_the_named_expert(tiny_backbone, one_torch_thread) -> None:
    import torch

    from dmoerm.experts import BackboneConfig
    from dmoerm.model import new_dmoerm
    from dmoerm.training.trunk_cache import TrunkCache

    taxonomy = Taxonomy("t", (Category("code", "programming", (Capability("correctness", "right"),)),))
    torch.manual_seed(0)
    config = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    model = new_dmoerm(config, taxonomy, ["code"], init_lora_weights=False)
    model.bank.add_expert("code__correctness")
    conversations = [(Message("user", f"fix bug {i}"),) for i in range(12)]
    pairs = [(f"def f(): return {i}", "I am sorry" * (i % 3 + 1)) for i in range(12)]
    # Reference: the expert's capability score through DMoERM.score (its own trunk pass, no cache).
    ref = model.score([list(c) for c in conversations for _ in (0, 1)], [r for p in pairs for r in p])
    expert_prefers_a = [
        ref[2 * i].capability_scores["correctness"] > ref[2 * i + 1].capability_scores["correctness"]
        for i in range(12)
    ]
    # Labels that agree with the expert on the first 9 pairs and disagree on the last 3: exactly 9/12.
    labels = [
        CapabilityLabel(conversations[i], *pairs[i], "correctness", "ab"[(expert_prefers_a[i]) == (i >= 9)])
        for i in range(12)
    ]
    want = 9
    cache = TrunkCache()
    got = expert_agreement(model, "code__correctness", labels + [lab("t", "correctness", "tie")], cache)
    assert got == {"n": 12, "agreement": want / 12}
    flipped = [
        CapabilityLabel(
            x.conversation, x.response_a, x.response_b, x.capability, "b" if x.winner == "a" else "a"
        )
        for x in labels
    ]
    assert expert_agreement(model, "code__correctness", flipped, cache)["agreement"] == pytest.approx(
        1 - want / 12
    )
    assert expert_agreement(model, "code__correctness", [], cache) == {"n": 0, "agreement": None}
    with pytest.raises(KeyError, match=r"no expert 'code__style' in the model; it has"):
        expert_agreement(model, "code__style", labels, cache)


def test_importing_loads_no_torch_and_no_data():
    import subprocess
    import sys

    code = (
        "import sys, dmoerm.labelling.human as h; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert h._records.cache_info().currsize == 0; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
