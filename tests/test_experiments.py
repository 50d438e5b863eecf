"""The FineGrainedRLHF experiment (issue 9) on a tiny backbone and a sample of the real file."""

from __future__ import annotations

import json

import pytest

from dmoerm.data import Message
from dmoerm.evaluation.finegrained import FineGrainedConfig, judge_vs_human, run_finegrained
from dmoerm.labelling.schema import CapabilityLabel


def label(cap: str, winner: str, a: str = "x", b: str = "y") -> CapabilityLabel:
    return CapabilityLabel((Message("user", "q"),), a, b, cap, winner, category="long_form_qa")


def test_judge_vs_human_counts_kept_and_agreeing_labels():
    human = [label("relevance", "a"), label("relevance", "b", a="u"), label("factuality", "b")]
    judge = [label("relevance", "a"), label("relevance", "a", a="u"), label("completeness", "a")]
    out = judge_vs_human(judge, human)
    assert out["relevance"] == {"human": 2, "kept": 2, "agree": 1, "agreement": 0.5}
    assert out["factuality"] == {"human": 1, "kept": 0, "agree": 0, "agreement": None}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="judge: 'gpt' is not one of local, none"):
        FineGrainedConfig(judge="gpt")
    with pytest.raises(ValueError, match="phase1_records"):
        FineGrainedConfig(phase1_records=0)


@pytest.mark.slow
def test_finegrained_experiment_runs_on_real_data(tmp_path, tiny_backbone, data_dir):
    config = FineGrainedConfig(
        output_dir=str(tmp_path / "fg"),
        backbone=tiny_backbone,
        max_length=96,
        phase1_records=10,
        phase3_records=8,
        dev_records=4,
        test_records=8,
        epochs=1,
        judge="local",
        judge_max_length=256,
    )
    results = run_finegrained(config, progress=False)
    systems = results["systems"]
    assert set(systems) == {
        "single RM (overall preferences)",
        "DMoERM, experts on human aspect labels",
        "DMoERM, experts on local judge labels",
    }
    human = systems["DMoERM, experts on human aspect labels"]
    assert human["labels"] > 0 and human["experts"], human
    for row in human["experts"].values():
        assert row["n"] > 0 and 0.0 <= row["agreement"] <= 1.0
    assert sum(r["human"] for r in results["judge_vs_human"].values()) == human["labels"]
    saved = json.loads((tmp_path / "fg" / "results.json").read_text())
    assert saved["systems"].keys() == systems.keys()
    assert "| system |" in (tmp_path / "fg" / "report.md").read_text()
