"""The pipeline under a 2-process launch (gloo on CPU, ``torch.distributed.run``): ``dmoerm train`` ends with
the model of a 1-process run, rank 0 alone writes the run folder, a killed 2-process run resumes like a
straight one, and ``dmoerm eval`` on 2 processes gives the 1-process table."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import job_config_dict

ATOL = 1e-5
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    args: list[str],
    guard: Path | None = None,
    kill_after: str | None = None,
    check: bool = True,
    fsdp: Path | None = None,
):
    """``dmoerm <args>`` as 2 processes (``fsdp``: under that accelerate config's FSDP); the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    (
        env.pop("DMOERM_TEST_GUARD", None),
        env.pop("DMOERM_TEST_KILL_AFTER", None),
        env.pop("DMOERM_TEST_FSDP", None),
    )
    if fsdp is not None:
        env["DMOERM_TEST_FSDP"] = str(fsdp)
    if guard is not None:
        env["DMOERM_TEST_GUARD"] = str(guard)
    if kill_after is not None:
        env["DMOERM_TEST_KILL_AFTER"] = kill_after
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(HERE / "distributed_pipeline_worker.py"), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RANK-WRITE" not in proc.stderr, [ln for ln in proc.stderr.splitlines() if "RANK-WRITE" in ln]
    return proc


def _config_file(folder: Path, tiny_backbone: str, name: str) -> Path:
    obj = job_config_dict(folder, tiny_backbone, output_dir=str(folder / name))
    obj["trunk_cache_dir"] = str(folder / f"{name}_trunk_cache")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(obj))
    return path


def _train(config: Path, **launch) -> Path:
    _launch(["train", "--config", str(config), "--no-progress"], guard=config.with_suffix(""), **launch)
    return config.with_suffix("")


def _test_rewards(run: Path, records) -> torch.Tensor:
    from dmoerm.model import load_model

    model = load_model(run / "model")
    out = model.score(
        [r.conversation for r in records for _ in r.responses], [x for r in records for x in r.responses]
    )
    return torch.tensor([o.reward for o in out])


def _files(run: Path) -> set[str]:
    """The run folder's files; SQLite's -wal/-shm files exist while a connection is open (the 1-process run's
    judge cache, in this process), so they are left out."""
    return {
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture(scope="module")
def runs(tiny_backbone, tmp_path_factory):
    """The same tiny job on 1 process (in this process) and on 2 (launched): their run folders."""
    from dmoerm.pipeline import PipelineConfig, run_pipeline

    folder = tmp_path_factory.mktemp("dist_pipeline")
    one = _config_file(folder, tiny_backbone, "one")
    torch.set_num_threads(1)
    run_pipeline(PipelineConfig.from_file(one), progress=False)
    two = _train(_config_file(folder, tiny_backbone, "two"))
    return folder, one.with_suffix(""), two


def _test_records(run: Path):
    from dmoerm.data import load_data

    return list(load_data(str(run / "splits" / "test.jsonl")))


@pytest.mark.slow
def test_two_process_train_gives_the_one_process_model_and_rank0_alone_writes(runs):
    from dmoerm.pipeline.report import eval_folder
    from dmoerm.training.trunk_store import TrunkStore

    folder, one, two = runs
    test = _test_records(one)
    assert _test_records(two) == test
    diff = float((_test_rewards(one, test) - _test_rewards(two, test)).abs().max())
    print("max |reward difference|, 1 vs 2 processes, on the test responses:", diff)
    assert diff <= ATOL
    assert _files(one) == _files(two)  # no stray file from rank 1 (the guard refused any write under two/)
    state1, state2 = (json.loads((r / "state.json").read_text()) for r in (one, two))
    assert state1.keys() == state2.keys() and "eval" in state2 and "phase3/chat" in state2
    assert state1["_inputs"] == state2["_inputs"]
    for name in ("DMoERM", "single RM"):
        e1, e2 = (json.loads((r / "eval" / eval_folder(name) / "eval.json").read_text()) for r in (one, two))
        assert e1["overall"]["agreement"] == e2["overall"]["agreement"], name
    # The shared on-disk trunk cache: both ranks wrote their shares into one SQLite file, and it holds the
    # states of the 1-process run's (every input's), no more.
    assert len(TrunkStore(folder / "two_trunk_cache")) == len(TrunkStore(folder / "one_trunk_cache")) > 0


@pytest.mark.slow
def test_two_process_train_under_fsdp2_gives_the_one_process_model(runs, tiny_backbone):
    """`dmoerm train` on 2 processes under the shipped configs/accelerate/fsdp.yaml (FSDP2): every bank stage
    (warm start, phase 1, phase-2 experts, single RM) trains sharded and hands back a whole bank, so the saved
    model scores the test responses as the 1-process run's does, and the run folder has the same files."""
    folder, one, _ = runs
    config = _config_file(folder, tiny_backbone, "fsdp")
    fsdp = config.with_suffix("")
    args = ["train", "--config", str(config), "--no-progress"]
    proc = _launch(args, guard=fsdp, fsdp=HERE.parent / "configs" / "accelerate" / "fsdp.yaml")
    units = re.findall(r"FSDP-UNITS rank (\d): (\d+) sharded (\d+)", proc.stderr)
    print("FSDP2 training views per rank (prepared, sharded):", units)
    assert sorted(r for r, _, _ in units) == ["0", "1"] and all(n == m != "0" for _, n, m in units), units
    test = _test_records(one)
    diff = float((_test_rewards(one, test) - _test_rewards(fsdp, test)).abs().max())
    print("max |reward difference|, 1 process vs 2 under FSDP2, on the test responses:", diff)
    assert diff <= ATOL
    assert _files(one) == _files(fsdp)


@pytest.mark.slow
def test_a_changed_input_stops_every_rank_of_a_two_process_rerun(runs):
    folder, _, two = runs
    before = (two / "state.json").read_text()
    args = ["train", "--config", str(folder / "two.json"), "--no-progress", "--set", "phase3.epochs=3"]
    proc = _launch(args, guard=two, check=False)
    stops = [
        ln for ln in proc.stderr.splitlines() if re.search(r"stage phase3/\w+ finished with other inputs", ln)
    ]
    assert proc.returncode != 0 and len(stops) == 2, proc.stderr[
        -3000:
    ]  # rank 0's stop, raised on both ranks
    assert (two / "state.json").read_text() == before


def _killed_then_resumed_on_one_process(folder: Path, tiny_backbone: str, stage: str, monkeypatch) -> Path:
    """The tiny job on 1 process, stopped right after ``stage`` was recorded, then rerun: its run folder."""
    from dmoerm.pipeline import PipelineConfig, run_pipeline
    from dmoerm.pipeline.stages import RunContext

    config = PipelineConfig.from_file(_config_file(folder, tiny_backbone, "killed_one"))
    record = RunContext.record

    def record_then_stop(self, name, *args, **kwargs):
        record(self, name, *args, **kwargs)
        if name == stage:
            raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(RunContext, "record", record_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(config, progress=False)
    # The rerun in a new process, as the 2-process rerun's ranks are (the global RNG as a process starts).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    rerun = [sys.executable, "-m", "dmoerm.cli", "train", "--config", str(folder / "killed_one.json")]
    proc = subprocess.run([*rerun, "--no-progress"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(config.output_dir)


@pytest.mark.slow
def test_two_process_run_killed_after_a_stage_resumes_to_the_straight_model(runs, tiny_backbone, monkeypatch):
    folder, one, two = runs
    config = _config_file(folder, tiny_backbone, "killed")
    run = config.with_suffix("")
    killed = _launch(
        ["train", "--config", str(config), "--no-progress"], guard=run, kill_after="phase3/code", check=False
    )
    assert killed.returncode != 0 and "KILLED rank 1 after phase3/code" in killed.stderr
    state = json.loads((run / "state.json").read_text())
    assert "phase3/code" in state and "phase3/chat" not in state and "eval" not in state
    resumed = _launch(["train", "--config", str(config), "--no-progress"], guard=run)
    finished = [ln.split("finished: ", 1)[1] for ln in resumed.stderr.splitlines() if "resuming from" in ln]
    assert len(finished) == 2 and finished[0] == finished[1]  # both ranks skip the same stages
    assert "phase3/code" in finished[0] and "phase1/chat" not in finished[0]
    assert "eval" in json.loads((run / "state.json").read_text())
    # The same kill and rerun on 1 process; both reruns restore the RNG states saved after phase3/code, so a
    # new expert starts as in a straight run (without it the rewards were 5e-2 to 1e-1 apart).
    one_resumed = _killed_then_resumed_on_one_process(folder, tiny_backbone, "phase3/code", monkeypatch)
    test = _test_records(one)
    diffs = {
        "2 processes: resumed vs straight": _max_diff(run, two, test),
        "resumed 2 processes vs straight 1 process": _max_diff(run, one, test),
        "1 process: resumed vs straight": _max_diff(one_resumed, one, test),
    }
    print("max |reward difference| on the test responses:", diffs)
    assert all(d <= ATOL for d in diffs.values()), diffs


def _max_diff(run_a: Path, run_b: Path, records) -> float:
    return float((_test_rewards(run_a, records) - _test_rewards(run_b, records)).abs().max())


@pytest.mark.slow
def test_two_process_eval_gives_the_one_process_table(runs):
    from dmoerm.evaluation import EvalConfig, run_eval

    folder, one, _ = runs
    data = str(one / "splits" / "test.jsonl")
    run_eval(EvalConfig(model=str(one / "model"), data=[data], out=str(folder / "eval1"), system="m"))
    _launch(
        [
            "eval",
            "--model",
            str(one / "model"),
            "--data",
            data,
            "--out",
            str(folder / "eval2"),
            "--system",
            "m",
        ],
        guard=folder / "eval2",
    )
    e1, e2 = (json.loads((folder / f / "eval.json").read_text()) for f in ("eval1", "eval2"))
    e1.pop("throughput"), e2.pop("throughput")
    diff = _json_diff(e1, e2)
    print("eval.json, 1 vs 2 processes: max |difference|", diff)
    assert diff <= 1e-6  # each rank scores its share in its own length buckets: rounding-level differences
    assert e1["overall"]["agreement"] == e2["overall"]["agreement"]
    assert [c["agreement"] for c in e1["per_category"]] == [c["agreement"] for c in e2["per_category"]]
    tables = [
        [ln for ln in (folder / f / "eval.md").read_text().splitlines() if not ln.startswith("Scored")]
        for f in ("eval1", "eval2")
    ]
    assert tables[0] == tables[1]  # the table, every figure as printed (the throughput line left out)


def _json_diff(a, b) -> float:
    """The largest difference between two JSON values' numbers; their structure and other values must agree."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_json_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b)
        return max([_json_diff(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    assert a == b
    return 0.0


def test_a_resumed_run_restores_the_rng_states_when_its_first_stage_starts(tmp_path, caplog):
    from dmoerm.pipeline.files import save_rng_state, write_json
    from dmoerm.pipeline.state import RNG_FILE, StageState, restore_rng_on_resume

    write_json(tmp_path / "state.json", {"router": {}})
    torch.manual_seed(3)
    save_rng_state(tmp_path / RNG_FILE, "router")
    expected = torch.rand(4)
    stages = StageState(tmp_path / "state.json")
    restore_rng_on_resume(stages)
    torch.manual_seed(99)
    assert "router" in stages  # a finished stage restores nothing
    assert "phase1/code" not in stages  # the first stage to start: the states saved after the router
    assert torch.equal(torch.rand(4), expected)
    # Saved after a stage the state does not record (killed between the two writes): nothing restored.
    save_rng_state(tmp_path / RNG_FILE, "phase1/code")
    stages = StageState(tmp_path / "state.json")
    restore_rng_on_resume(stages)
    assert stages.on_first_start is None
    (tmp_path / RNG_FILE).write_bytes(b"not a torch file")
    with caplog.at_level("WARNING"):
        restore_rng_on_resume(StageState(tmp_path / "state.json"))
    assert f"{RNG_FILE}: unreadable" in caplog.text
