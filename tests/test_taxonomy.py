"""Taxonomy files, presets, validation, label mapping and its coverage of the bundled data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dmoerm.data import Message, PreferenceRecord, PromptRecord, load_source
from dmoerm.taxonomy import (
    Capability,
    Category,
    Taxonomy,
    assign_categories,
    load_taxonomy,
    save_taxonomy,
)


@pytest.fixture(scope="module")
def default() -> Taxonomy:
    return load_taxonomy("default")


def minimal() -> dict:
    return {
        "name": "t",
        "categories": [
            {
                "name": "chat",
                "description": "Casual talk.",
                "capabilities": [{"name": "empathy", "definition": "Cares."}],
            },
            {
                "name": "code",
                "description": "Programming.",
                "capabilities": [{"name": "correctness", "definition": "Works."}],
            },
        ],
        "mappings": {"src": {"talk": "chat", "Helpfulness/Code": "code", "Helpfulness/Code/Docs": None}},
    }


def write(tmp_path: Path, data: dict, name: str = "t.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Presets


def test_paper_preset() -> None:
    t = load_taxonomy("paper")
    assert t.category_names == ("roleplay", "chat", "subjective_qa", "objective_qa", "text_creation")
    assert "empathy_ability" in t.category("roleplay").capability_names
    assert "conversational_sense" in t.category("roleplay").capability_names
    for c in t.categories:
        assert 4 <= len(c.capabilities) <= 6
        assert c.description_zh and all(cap.definition_zh for cap in c.capabilities)


def test_default_preset(default: Taxonomy) -> None:
    assert set(load_taxonomy("paper").category_names) < set(default.category_names)
    assert {"code", "safety", "reasoning"} <= set(default.category_names)
    for c in default.categories:
        assert 3 <= len(c.capabilities) <= 6
        assert c.description_zh and all(cap.definition and cap.definition_zh for cap in c.capabilities)


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_preset_round_trip(tmp_path: Path, preset: str) -> None:
    t = load_taxonomy(preset)
    for name in ("t.yaml", "t.json"):
        save_taxonomy(t, tmp_path / name)
        back = load_taxonomy(tmp_path / name)
        assert back == t and back.mappings == t.mappings


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda d: d["categories"][0].update(name="Chat"),
            r"categories\[0\].*'Chat' is not a lower-case identifier.*'chat'",
        ),
        (
            lambda d: d["categories"][1]["capabilities"][0].update(name="code quality"),
            r"categories\[1\]\.capabilities\[0\].*'code quality'.*use e\.g\. 'code_quality'",
        ),
        (lambda d: d["categories"][1].update(name="chat"), "'chat' appears twice"),
        (
            lambda d: d["categories"][0]["capabilities"].append({"name": "empathy", "definition": "x"}),
            "capability 'empathy' appears twice",
        ),
        (lambda d: d["categories"][0].update(capabilities=[]), "capabilities is empty; give at least one"),
        (
            lambda d: d["mappings"]["src"].update(x="nope"),
            r"mappings\.src\['x'\]: unknown category 'nope'.*or null",
        ),
        (lambda d: d["categories"][0].pop("description"), r"categories\[0\]\.description: missing"),
        (
            lambda d: d["categories"][0]["capabilities"][0].update(definition=""),
            "definition: must be a non-empty",
        ),
        (lambda d: d["categories"][0].update(colour="red"), r"categories\[0\]: unknown key\(s\) colour"),
        (lambda d: d.update(categories=[]), "categories: empty"),
    ],
)
def test_validation_errors(tmp_path: Path, edit, pattern: str) -> None:
    data = minimal()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=pattern) as info:
        load_taxonomy(path)
    assert str(path) in str(info.value)


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="not a lower-case identifier"):
        Capability("9lives", "x")
    with pytest.raises(ValueError, match="capabilities is empty"):
        Category("chat", "x", ())
    cat = Category("chat", "x", [Capability("a", "b")])
    assert isinstance(cat.capabilities, tuple)
    with pytest.raises(ValueError, match="unknown category 'code'"):
        Taxonomy("t", (cat,), mappings={"s": {"l": "code"}})


def test_unknown_preset_or_file() -> None:
    with pytest.raises(FileNotFoundError, match="presets: paper, default"):
        load_taxonomy("nonexistent")


def test_lookups() -> None:
    t = Taxonomy.from_dict(minimal())
    assert t.category("code").name == "code"
    with pytest.raises(KeyError, match="has no category 'x'"):
        t.category("x")
    assert t.category("chat").capability("empathy").definition == "Cares."


# ---------------------------------------------------------------------------------------------------------------
# Mapping


def test_map_label_rules() -> None:
    t = Taxonomy.from_dict(minimal())
    assert t.map_label("src", "talk") == "chat"
    assert t.map_label("src", "Helpfulness/Code/Data Management") == "code"  # longest prefix
    assert t.map_label("src", "Helpfulness/Code/Docs") is None  # a longer entry mapped to null
    assert t.map_label("src", "Helpfulness/Code/Docs/More") is None
    assert t.map_label("src/train", "talk") == "chat"  # the family's table
    assert t.map_label("src", "code") == "code"  # a category name maps to itself
    assert t.map_label("other", "talk") is None
    assert t.map_label("src", None) is None
    assert t.lookup("src", "Helpfulness/Code/Docs") == (True, None)
    assert t.lookup("src", "unknown") == (False, None)


def test_default_rmb_examples(default: Taxonomy) -> None:
    assert default.map_label("rmb/pairwise_helpfulness", "Helpfulness/Code/Data Management") == "code"
    assert (
        default.map_label("rmb/bon_helpfulness", "Helpfulness/Open QA/Personal Opinion and Advice")
        == "subjective_qa"
    )
    assert default.map_label("rmb/bon_helpfulness", "Helpfulness/Open QA/Factual") == "objective_qa"
    assert default.map_label("rmb/pairwise_harmlessness", "Harmlessness/S11") == "safety"
    assert default.map_label("autoj/train", "default") is None


@pytest.fixture(scope="module")
def rmb_subsets(data_dir: Path) -> set[str]:
    return {r.category for r in load_source("rmb", data_dir)}


@pytest.fixture(scope="module")
def autoj_labels(data_dir: Path) -> set[str]:
    return {r.category for r in load_source("autoj", data_dir)}


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_every_rmb_subset_is_mapped(rmb_subsets: set[str], preset: str) -> None:
    t = load_taxonomy(preset)
    assert len(rmb_subsets) == 37 + 12
    unmatched = [s for s in rmb_subsets if not t.lookup("rmb/pairwise_helpfulness", s)[0]]
    assert not unmatched
    if preset == "default":
        assert all(t.map_label("rmb", s) is not None for s in rmb_subsets)


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_every_autoj_label_is_mapped(autoj_labels: set[str], preset: str) -> None:
    t = load_taxonomy(preset)
    assert len(autoj_labels) == 59
    assert set(t.mappings["autoj"]) == autoj_labels, "an explicit entry for every Auto-J label"
    if preset == "default":
        assert [x for x in autoj_labels if t.map_label("autoj", x) is None] == ["default"]


def test_prompt_sets_mapped(data_dir: Path, default: Taxonomy) -> None:
    for name in ("alignbench", "arena_hard/v2.0"):
        recs = assign_categories(load_source(name, data_dir), default)
        assert all(r.category in default.category_names for r in recs)


def test_assign_categories(caplog) -> None:
    t = Taxonomy.from_dict(minimal())
    conv = (Message("user", "hi"),)
    recs = [
        PreferenceRecord(conv, ("a", "b"), (0, 1), category="talk", source="src"),
        PreferenceRecord(conv, ("a", "b"), (0, 1), category="mystery", source="src"),
        PreferenceRecord(conv, ("a", "b"), (0, 1), category="Helpfulness/Code/Docs", source="src"),
        PromptRecord(conv, category="Helpfulness/Code/X", source="src/test"),
    ]
    with caplog.at_level(logging.INFO, logger="dmoerm.taxonomy"):
        out = assign_categories(recs, t)
    assert [r.category for r in out] == ["chat", None, None, "code"]
    assert [type(r) for r in out] == [type(r) for r in recs]
    assert out[1].meta["source_label"] == "mystery" and recs[1].meta == {}
    assert "1 of 4 record(s) have a label with no mapping" in caplog.text and "src:mystery (1)" in caplog.text
    assert "mapped to null: src:Helpfulness/Code/Docs (1)" in caplog.text
    assert [r.category for r in assign_categories(recs, t, source="other")] == [None, None, None, None]


def test_pooled_taxonomy_has_one_category_with_every_capability_point_once():
    from dmoerm.taxonomy import load_taxonomy

    default = load_taxonomy("default")
    pooled = default.pooled()
    assert pooled.category_names == ("pooled",)
    names = [c.name for c in default.categories for c in c.capabilities]
    assert pooled.category("pooled").capability_names == tuple(dict.fromkeys(names))
    # A point shared by two categories keeps its first definition.
    first = next(c for c in default.categories if "relevance" in c.capability_names).capability("relevance")
    assert pooled.category("pooled").capability("relevance") == first
