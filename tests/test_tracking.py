"""Experiment tracking (issue 15 item 5): `report_to: none | tensorboard | wandb` through accelerate's trackers;
TensorBoard event files read back with TensorBoard's own reader, an offline W&B run read back from its file."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys
import time

import pytest

from dmoerm.pipeline import PipelineConfig, run_pipeline
from dmoerm.tracking import Tracker
from helpers import job_config

HISTORY = {"step": [1, 2, 3], "loss": [0.9, 0.7, 0.4], "dev_step": [3], "dev_agreement": [0.75]}


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every event file under ``folder``, read by TensorBoard's own loader."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_file) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of ``wandb_internal_pb2.Record``)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment: one record
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_history(run_file, timeout: float = 30.0) -> list[dict[str, float]]:
    """The history rows of a finished offline run: wandb's core process writes the file, so wait for its
    ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "exit" in kinds, f"no exit record in {run_file} after {timeout} s"
    # A key with "/" is stored split into nested_key.
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r, kind in zip(records, kinds)
        if kind == "history"
    ]


@pytest.mark.slow  # a fresh interpreter importing torch: about 4 s
def test_none_is_a_no_op_and_imports_no_tracker_package(tmp_path):
    tracker = Tracker("none", tmp_path)
    tracker.log_stage("phase1/code", {"steps": 3}, HISTORY)
    tracker.close()
    assert not tracker.enabled and list(tmp_path.iterdir()) == []
    code = (
        "import sys, dmoerm.pipeline, dmoerm.tracking\n"
        "dmoerm.tracking.Tracker('none', '.').log_stage('x', {'a': 1})\n"
        "bad = [m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard', 'tensorboardX') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_report_to_is_checked_with_the_config(monkeypatch):
    with pytest.raises(ValueError, match="report_to: 'mlflow' is not one of none, tensorboard, wandb"):
        PipelineConfig.from_dict({"report_to": "mlflow"})
    assert PipelineConfig().report_to == "none"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"needs the tensorboard package: pip install 'dmoerm\[track\]'"):
        Tracker("tensorboard", ".")


def test_tensorboard_events_hold_curves_and_stage_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker("tensorboard", tmp_path / "run", config={"phase1": {"epochs": 3}})
    tracker.log_stage("phase1/code", {"best_dev_agreement": 0.75, "steps": 3, "note": "text"}, HISTORY)
    tracker.log_stage("router", {"accuracy": 0.5, "per_category": {"code": {"n": 4, "accuracy": 0.25}}})
    tracker.close()
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "run")
    assert scalars["phase1/code/loss"] == [
        (1, pytest.approx(0.9)),
        (2, pytest.approx(0.7)),
        (3, pytest.approx(0.4)),
    ]
    assert scalars["phase1/code/dev_agreement"] == [(3, 0.75)]
    assert scalars["phase1/code/best_dev_agreement"] == [(3, 0.75)] and scalars["phase1/code/steps"] == [
        (3, 3.0)
    ]
    assert scalars["router/accuracy"] == [(0, 0.5)] and scalars["router/per_category/code/accuracy"] == [
        (0, 0.25)
    ]
    assert "phase1/code/note" not in scalars


@pytest.mark.slow
def test_wandb_offline_run_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = Tracker("wandb", tmp_path / "run", config={"phase1": {"epochs": 3}})
    tracker.log_stage("phase1/code", {"best_dev_agreement": 0.75}, HISTORY)
    tracker.log_stage("labels/code", {"kept": 5, "asked": 8})
    tracker.close()
    (run_file,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(run_file)
    losses = [(r["phase1/code/step"], r["phase1/code/loss"]) for r in rows if "phase1/code/loss" in r]
    assert losses == [(1, 0.9), (2, 0.7), (3, 0.4)]
    assert [r["phase1/code/dev_agreement"] for r in rows if "phase1/code/dev_agreement" in r] == [0.75]
    assert any(r.get("labels/code/kept") == 5 and r.get("labels/code/asked") == 8 for r in rows)


@pytest.mark.slow
def test_pipeline_reports_every_phase_to_tensorboard(tmp_path, tiny_backbone):
    pytest.importorskip("tensorboard")
    config = job_config(tmp_path, tiny_backbone, report_to="tensorboard")
    run_pipeline(config, progress=False)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    for c in ("code", "chat"):
        assert len(scalars[f"phase1/{c}/loss"]) == state[f"phase1/{c}"]["steps"]
        assert scalars[f"phase1/{c}/best_dev_agreement"][0][1] == pytest.approx(
            state[f"phase1/{c}"]["best_dev_agreement"]
        )
        assert f"phase3/{c}/loss" in scalars
    experts = [s for s in state if s.startswith("phase2/")]
    assert experts and all(f"{s}/loss" in scalars and f"{s}/labels" in scalars for s in experts)
    assert "router/loss" in scalars and "router/accuracy" in scalars and "baseline/loss" in scalars
    assert any(t.startswith("labels/code/") for t in scalars)
    assert scalars["eval/router_test_accuracy"][0][1] == pytest.approx(state["eval"]["router_test_accuracy"])
    assert "eval/DMoERM/agreement" in scalars and "eval/single RM/agreement" in scalars
