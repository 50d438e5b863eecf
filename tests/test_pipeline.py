"""The whole job on a tiny backbone: router, labels from a local judge, three phases, baseline, report, resume."""

from __future__ import annotations

import json

import pytest

from dmoerm.model import DMoERM, load_model
from dmoerm.pipeline import PipelineConfig, build_splits, load_preferences, run_pipeline
from dmoerm.training import phases
from helpers import job_config, tiny_taxonomy

TAXONOMY = tiny_taxonomy()


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_a_rerun_skips_finished_stages(tmp_path, tiny_backbone, monkeypatch):
    config = job_config(tmp_path, tiny_backbone, ensemble_size=2)
    result = run_pipeline(config, progress=False)
    out = tmp_path / "run"
    for name in ("report.md", "config.yaml", "state.json", "sizes.json", "curves/router.png"):
        assert (out / name).exists(), name
    systems = ("DMoERM", "DMoERM, experts averaged", "per-category RMs (routed)", "DMoERM, labelled category")
    for system in (*systems, "single RM"):
        assert system in result.table, system
    for rule in ("mean", "min", "uwo"):
        assert (out / "eval" / f"RM_ensemble_{rule}_N_2" / "eval.json").exists(), rule
    assert "RM ensemble (uwo, N=2)" in (out / "report.md").read_text()
    state = json.loads((out / "state.json").read_text())
    for stage in (
        "router",
        "phase1/code",
        "phase1/chat",
        "labels/code",
        "phase3/code",
        "phase3/chat",
        "baseline",
    ):
        assert stage in state, stage
    # Phase-2 experts exist for the points that got labels, each with its own head, and the model reloads.
    model = load_model(out / "model")
    assert isinstance(model, DMoERM)
    for c in ("code", "chat"):
        assert model.aggregator_experts[c], c
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["code"] == {"phase1": 12, "labels": 6, "phase3": 12, "dev": 4, "test": 6}
    scores = model.score([[{"role": "user", "content": "hello"}]], ["hi there"])
    assert scores[0].category in ("code", "chat")

    # A rerun trains nothing again: every phase function is now an error.
    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    for name in ("train_router", "train_phase1", "train_phase2", "train_phase3"):
        monkeypatch.setattr(f"dmoerm.pipeline.stages.{name}", boom)
    monkeypatch.setattr("dmoerm.training.single.train_expert", boom)  # the baseline and ensemble load
    again = run_pipeline(config, progress=False)
    assert again.table == result.table


@pytest.mark.slow
def test_pipeline_resumes_after_a_crash_in_a_later_phase(tmp_path, tiny_backbone, monkeypatch):
    config = job_config(tmp_path, tiny_backbone, labels={"source": "none"}, baseline=False)
    calls = []
    real_phase3 = phases.train_phase3

    def crash_on_second(model, category, *a, **k):
        calls.append(category)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_phase3(model, category, *a, **k)

    monkeypatch.setattr("dmoerm.pipeline.stages.train_phase3", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert "phase3/code" in state and "phase3/chat" not in state
    # The rerun redoes only the unfinished stage.
    trained = []
    monkeypatch.setattr("dmoerm.pipeline.stages.train_phase1", lambda *a, **k: trained.append("phase1"))
    monkeypatch.setattr(
        "dmoerm.pipeline.stages.train_phase3",
        lambda m, c, *a, **k: trained.append(c) or real_phase3(m, c, *a, **k),
    )
    run_pipeline(config, progress=False)
    assert trained == ["chat"]
    assert "phase3/chat" in json.loads((tmp_path / "run" / "state.json").read_text())


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^data: unknown field\(s\) phase_one"):
        PipelineConfig.from_dict({"data": {"phase_one": 3}})
    with pytest.raises(ValueError, match="label_records"):
        PipelineConfig.from_dict({"data": {"phase1_records": 4, "label_records": 8}})
    with pytest.raises(ValueError, match="ensemble_size: must be >= 0"):
        PipelineConfig.from_dict({"ensemble_size": -1})
    with pytest.raises(ValueError, match="source"):
        PipelineConfig.from_dict({"labels": {"source": "gpt"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  test_records: 0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: data\.test_records: must be >= 1"):
        PipelineConfig.from_file(bad)


def test_overrides_set_nested_fields_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  test_records: 5\nphase1: {epochs: 2}\n")
    config = PipelineConfig.from_file(
        path, ["phase1.length_penalty=1.0", "phase3.length_penalty=0.5", "data.sources=[a.jsonl, b.jsonl]"]
    )
    assert config.phase1.length_penalty == 1.0 and config.phase1.epochs == 2
    assert config.phase3.length_penalty == 0.5
    assert config.data.sources == ["a.jsonl", "b.jsonl"] and config.data.test_records == 5
    with pytest.raises(ValueError, match="use section.field=value"):
        PipelineConfig.from_file(path, ["phase1.epochs"])
    with pytest.raises(ValueError, match="'test_records' is a value, not a section"):
        PipelineConfig.from_file(path, ["data.test_records.x=1"])
    with pytest.raises(ValueError, match=r"with overrides \['phase2.epoch=3'\]: .*unknown field\(s\) epoch"):
        PipelineConfig.from_file(path, ["phase2.epoch=3"])


@pytest.mark.slow
def test_without_router_ablation_pools_categories_into_one_inner_model(tmp_path, tiny_backbone, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the router trained although there is one category")

    monkeypatch.setattr("dmoerm.pipeline.stages.train_router", boom)
    config = job_config(tmp_path, tiny_backbone, without_router=True, baseline=False)
    result = run_pipeline(config, progress=False)
    out = tmp_path / "run"
    model = load_model(out / "model")
    assert model.categories == ["pooled"]
    # One expert per capability point of either category, trained on the pooled labels of that point.
    cats = {c.name: c for c in model.taxonomy.categories}
    assert set(cats["pooled"].capability_names) == {"correctness", "brevity", "empathy"}
    experts = {e.removeprefix("pooled__") for e in model.category_experts("pooled")}
    assert experts == {"correctness", "brevity", "empathy"}  # labels from both categories' records
    # The same test records as the routed run, reported per their own category.
    routed = build_splits(load_preferences(config.data, TAXONOMY), ["code", "chat"], config.data)
    assert json.loads((out / "sizes.json").read_text()) == {
        "pooled": {
            k: sum(v[k] for v in routed.sizes().values())
            for k in ("phase1", "labels", "phase3", "dev", "test")
        }
    }
    assert "DMoERM without router" in result.table
    for c in ("code", "chat"):
        assert f"| {c} (n={len(routed.test[c])}) |" in result.table
