"""The reliability probe (benchmarks/probe_reliability.py) still runs: three bad data files through the real
``dmoerm eval`` command, judged by the probe's own check, and its check does not take an echoed field name or
an INFO line for a clear error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dmoerm.data import save_jsonl
from dmoerm.experts import BackboneConfig
from dmoerm.reward_model import RewardModel
from helpers import length_records

PROBE = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_reliability.py"


def _probe():
    spec = importlib.util.spec_from_file_location("probe_reliability", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("probe_reliability", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bad_data_files_through_the_cli_are_handled(tmp_path, tiny_backbone):
    probe = _probe()
    save_jsonl(length_records(10, seed=3, category="code"), tmp_path / "eval_good.jsonl")
    bb = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    RewardModel.create(bb).save_pretrained(tmp_path / "rm")
    files = {"eval_data": tmp_path / "eval_good.jsonl", "eval_model": tmp_path / "rm"}
    cases = probe.data_cases(tmp_path, files, train=False, only={"malformed_json", "non_utf8", "empty_file"})
    assert [c.name for c in cases] == ["eval: malformed_json", "eval: non_utf8", "eval: empty_file"]
    results = [probe.run_cli_case(c, timeout=120) for c in cases]
    for r in results:
        assert r.handled, r
        assert r.returncode == 2 and not r.traceback
    assert "eval_malformed_json.jsonl:3:" in results[0].message
    assert "eval_non_utf8.jsonl:6:" in results[1].message


def test_the_check_wants_the_field_in_the_error_itself():
    probe = _probe()
    case = probe.Case("x", "train-config", ["train"], [r"learning_rate"], ["phase1.learning_rate=abc"])
    echoed = "12:00:00 ERROR dmoerm: c.yaml with overrides ['phase1.learning_rate=abc']: '<=' not supported\n"
    assert probe.judge(case, 2, echoed).handled is False
    named = "12:00:00 ERROR dmoerm: phase1.learning_rate: 'abc' is not a number\n"
    assert probe.judge(case, 2, named).handled is True
    info_only = "12:00:00 INFO dmoerm: learning_rate 1e-3\n12:00:01 ERROR dmoerm: something is wrong\n"
    assert probe.judge(case, 2, info_only).handled is False
    traceback = "Traceback (most recent call last):\n  ...\nTypeError: learning_rate\n"
    assert probe.judge(case, 1, traceback).handled is False
    assert probe.judge(case, 0, named).handled is False
