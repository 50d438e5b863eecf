"""A judge outage during the pipeline's labelling stops the run (or, when allowed, is a reported degraded
state); failed questions are never cached, stay pending, and the next run asks exactly them."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dmoerm.config_check import RunStopped
from dmoerm.pipeline import PipelineConfig, build_splits, load_preferences, run_pipeline
from dmoerm.taxonomy import load_taxonomy
from helpers import http_server, job_config_dict
from test_labelling_api import KEY_ENV, SECRET, FakeServer, _handler


@pytest.fixture()
def judge_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    state = FakeServer()
    with http_server(_handler(state)) as base:
        state.url = f"{base}/v1"
        yield state


def _config(tmp_path, tiny_backbone, url: str, run: str, **labels) -> PipelineConfig:
    judge = {
        "model": "rule-judge",
        "base_url": url,
        "api_key_env": KEY_ENV,
        "max_retries": 1,
        "concurrency": 1,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.01,
        "timeout_s": 5.0,
        "progress": False,
    }
    obj = job_config_dict(
        tmp_path,
        tiny_backbone,
        labels={"source": "openai", "judge": judge, "min_labels": 1, **labels},
        baseline=False,
    )
    obj["output_dir"] = str(tmp_path / run)
    return PipelineConfig.from_dict(obj)


def _one_question(config: PipelineConfig) -> tuple[str, str]:
    """Substrings of the two prompts (both orders) of one question: the first labelled pair of ``code``, one
    capability point."""
    taxonomy = load_taxonomy(config.data.taxonomy)
    splits = build_splits(load_preferences(config.data, taxonomy), ["code", "chat"], config.data)
    return (splits.to_label["code"][0].conversation[-1].content, "terms of correctness?")


def _cached_answers(run) -> int:
    with sqlite3.connect(run / "labels" / "judge.cache.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


@pytest.mark.slow
def test_an_outage_stops_the_run_and_the_next_run_asks_only_the_failed_questions(
    tmp_path, tiny_backbone, judge_server
):
    config = _config(tmp_path, tiny_backbone, judge_server.url, "run")
    judge_server.script = ["500"] * 10_000  # the judge is down
    with pytest.raises(
        RunStopped,
        match=r"labels/code: 12 of 12 judge questions failed after their retries "
        rf"\(judge at {judge_server.url}\); labelling is not marked finished.*only the failed",
    ):
        run_pipeline(config, progress=False)
    out = tmp_path / "run"
    state = json.loads((out / "state.json").read_text())
    assert "phase1/code" in state and "labels/code" not in state and "phase2/code/correctness" not in state
    assert _cached_answers(out) == 0  # failures are not answers

    # The judge is back except for one question (one pair, one point): it fails again and stops the run again.
    judge_server.script = []
    judge_server.targeted = ("500", _one_question(config), 10_000)
    with pytest.raises(RunStopped, match=r"labels/code: 1 of 12 judge questions failed"):
        run_pipeline(config, progress=False)
    assert _cached_answers(out) == 22  # 12 questions x 2 orders, but not the failed question's two
    judge_server.targeted = None
    asked = judge_server.answers
    run_pipeline(config, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert (
        state["labels/code"]["failed"] == 0 and state["labels/code"]["asked"] == 2
    )  # exactly the failed one
    assert (
        state["labels/code"]["cached"] == 0 and "degraded" not in state["labels/code"]
    )  # the rest were written
    assert state["labels/chat"]["failed"] == 0 and state["labels/chat"]["kept"] > 0
    assert judge_server.answers - asked == 2 + state["labels/chat"]["asked"]
    assert "phase3/code" in state and "degraded" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_an_allowed_share_of_failures_finishes_degraded_and_says_so(tmp_path, tiny_backbone, judge_server):
    config = _config(tmp_path, tiny_backbone, judge_server.url, "degraded", max_failed_share=0.5)
    judge_server.targeted = ("500", _one_question(config), 10_000)
    run_pipeline(config, progress=False)
    out = tmp_path / "degraded"
    state = json.loads((out / "state.json").read_text())
    assert state["labels/code"]["degraded"] is True and state["labels/code"]["failed"] == 1
    assert "labels/chat" in state and "degraded" not in state["labels/chat"]
    assert "(degraded: 1 failed)" in (out / "report.md").read_text()
