"""A rerun in the same output folder checks what it resumes: changed inputs stop it, naming the fields; lost or
damaged run files give errors naming the file, or retrain what they held."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from dmoerm.config_check import RunStopped
from dmoerm.pipeline import PipelineConfig, run_pipeline
from dmoerm.pipeline import stages as pipeline_stages
from dmoerm.pipeline.state import StageState, stage_inputs
from helpers import job_config, job_config_dict


def test_stage_inputs_name_the_fields_each_stage_reads():
    config = PipelineConfig()
    assert stage_inputs(config, "router")["router.epochs"] == 60
    assert "phase1.epochs" not in stage_inputs(config, "router")
    phase1 = stage_inputs(config, "phase1/code")
    assert (
        phase1["data.seed"] == 0 and phase1["model.lora_rank"] == 16 and "data.router_prompts" not in phase1
    )
    assert {"phase1.epochs", "labels.source", "phase2.epochs", "phase3.epochs"} <= set(
        stage_inputs(config, "phase3/code")
    )
    assert stage_inputs(config, "baseline_seed2")["phase1.seed"] == config.phase1.seed + 2
    assert stage_inputs(config, "eval") == {}
    assert "labels.max_failed_share" not in stage_inputs(config, "labels/code")


@pytest.mark.slow
def test_a_rerun_with_changed_inputs_stops_naming_them_and_a_lost_model_is_retrained(
    tmp_path, tiny_backbone, monkeypatch, caplog, capfd
):
    overrides = {"labels": {"source": "none"}, "baseline": False}
    config = job_config(tmp_path, tiny_backbone, **overrides)
    capfd.readouterr()
    first = run_pipeline(config, progress=False)
    bars = capfd.readouterr().err
    assert "it/s" not in bars and "%|" not in bars, bars  # progress=False (--no-progress): no bar at all
    out = tmp_path / "run"
    written = (out / "config.yaml").read_text()
    state = json.loads((out / "state.json").read_text())
    assert state["_inputs"]["phase1/code"]["data.seed"] == 0

    def changed(section: str, **fields) -> PipelineConfig:
        obj = job_config_dict(tmp_path, tiny_backbone, **overrides)
        obj.setdefault(section, {}).update(fields)
        return PipelineConfig.from_dict(obj)

    with pytest.raises(RunStopped, match=r"stage router finished with other inputs.*data\.seed: 0 -> 1"):
        run_pipeline(changed("data", seed=1), progress=False)
    with pytest.raises(
        RunStopped, match=r"stage router finished .*model\.lora_rank: 16 -> 4.*new --output-dir"
    ):
        run_pipeline(changed("model", lora_rank=4), progress=False)
    with pytest.raises(RunStopped, match=r"stage phase3/code finished .*phase3\.epochs: 2 -> 3"):
        run_pipeline(changed("phase3", epochs=3), progress=False)
    with pytest.raises(RunStopped, match=r"data\.phase1_records: 12 -> 10"):
        run_pipeline(changed("data", phase1_records=10), progress=False)
    data = tmp_path / "prefs.jsonl"  # the same path, other records
    before = data.read_bytes()
    data.write_bytes(before + before.splitlines(keepends=True)[0])  # one record more
    with pytest.raises(RunStopped, match=r"data\.sources\[0\] sha256: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        run_pipeline(config, progress=False)
    data.write_bytes(before)
    assert (out / "config.yaml").read_text() == written  # never rewritten to describe another model

    # A deleted model/ with state.json intact: its stages train again (a log line says so), the rest resume.
    shutil.rmtree(out / "model")
    trained = []
    real = vars(pipeline_stages)["train_phase3"]
    monkeypatch.setattr(
        "dmoerm.pipeline.stages.train_phase3", lambda m, c, *a, **k: trained.append(c) or real(m, c, *a, **k)
    )
    with caplog.at_level(logging.WARNING, logger="dmoerm.pipeline"):
        again = run_pipeline(config, progress=False)
    assert "model is missing but" in caplog.text and "training them again" in caplog.text
    assert sorted(trained) == ["chat", "code"]
    assert again.router["accuracy"] == first.router["accuracy"]  # seeded router: the same again

    # A damaged state.json names itself and the way out.
    (out / "state.json").write_text((out / "state.json").read_text()[:50])
    with pytest.raises(RunStopped, match=r"state\.json: damaged .*Delete the run folder"):
        run_pipeline(config, progress=False)


def test_a_started_stage_with_other_inputs_is_not_resumed(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path))
    stages = StageState(tmp_path / "state.json", config)
    assert "phase1/code" not in stages  # starts it: its inputs are recorded before any checkpoint exists
    other = PipelineConfig(output_dir=str(tmp_path))
    other.phase1.learning_rate = 1e-4
    with pytest.raises(
        RunStopped, match=r"phase1/code started \(its checkpoint holds them\).*0\.001 -> 0\.0001"
    ):
        StageState(tmp_path / "state.json", other)
    assert StageState(tmp_path / "state.json", config).inputs["phase1/code"]["phase1.learning_rate"] == 1e-3


@pytest.mark.slow
def test_restart_changed_retrains_the_changed_stage_and_every_stage_after_it(
    tmp_path, tiny_backbone, monkeypatch
):
    from dmoerm.cli import main

    overrides = {"labels": {"source": "none"}, "ensemble_size": 0}
    obj = job_config_dict(tmp_path, tiny_backbone, **overrides)
    run_pipeline(PipelineConfig.from_dict(obj), progress=False)
    out = tmp_path / "run"
    trained: list[str] = []
    for name in ("train_router", "train_phase1", "train_phase3"):
        real = vars(pipeline_stages)[name]

        def spy(*a, _name=name, _real=real, **k):
            trained.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(f"dmoerm.pipeline.stages.{name}", spy)

    # phase 3 changed: only the two aggregators train again; phase 1, the router and the baseline are kept.
    obj["phase3"] = {"epochs": 3, "batch_size": 8}
    config = PipelineConfig.from_dict(obj)
    with pytest.raises(RunStopped, match="--restart-changed"):
        run_pipeline(config, progress=False)
    config.resume = "restart"
    run_pipeline(config, progress=False)
    assert trained == ["train_phase3", "train_phase3"]
    state = json.loads((out / "state.json").read_text())
    assert state["_inputs"]["phase3/code"]["phase3.epochs"] == 3

    # phase 1 changed, through the command line: phase 1, phase 3 and the baseline train again; the model
    # folder is rebuilt (the router retrains from its seed), the written config describes the new model.
    trained.clear()
    path = tmp_path / "job.json"
    obj["phase1"] = dict(obj["phase1"], learning_rate=1e-2)
    path.write_text(json.dumps(obj))
    baseline_before = (out / "baseline" / "train_result.json").read_text()
    assert main(["train", "--config", str(path), "--restart-changed", "--no-progress"]) == 0
    assert sorted(trained) == sorted(["train_router"] + ["train_phase1"] * 2 + ["train_phase3"] * 2)
    assert (out / "baseline" / "train_result.json").read_text() != baseline_before
    assert "learning_rate: 0.01" in (out / "config.yaml").read_text()
    assert json.loads((out / "state.json").read_text())["_inputs"]["baseline"]["phase1.learning_rate"] == 1e-2
