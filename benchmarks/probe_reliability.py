"""Reliability probe: what a new user's mistakes, a kill -9 and a hostile client do to dmoerm (issue 14).

Four parts, each on a tiny random Llama backbone built in code (no download, ``HF_HUB_OFFLINE=1``), everything
on 127.0.0.1:

1. **bad inputs**: the real CLI (``python -m dmoerm.cli eval|train`` subprocesses) on generated bad data files
   (malformed JSON line, missing field, wrong type, lone surrogate, non-UTF-8 bytes, empty file, ...) and bad
   configs (``--set phase1.learning_rate=abc``, ``epochs: "3"``, a YAML syntax error, an unknown backbone,
   ...). A case is *handled* when the command exits nonzero, prints no Python traceback, and its message names
   the file and line (data) or the field (config) -- the text the user typed in ``--set`` is removed from the
   output before looking, so echoing it back does not count as naming the field.
2. **kills**: ``dmoerm train`` on a tiny job, SIGKILLed once ``k`` stages are recorded in ``state.json``, then
   rerun; it survived when the rerun exits 0 and its test-set rewards (DMoERM and single RM on
   ``splits/test.jsonl``) and ``eval/*/eval.json`` agreements equal an uninterrupted run's. A second
   uninterrupted run (``--control``) shows what differs between two runs anyway; the weight files a resume
   changes by more than 1e-4 are listed, and "survived but for nondeterminism" counts the resumes that change
   only what the control changes too.
3. **server**: ``dmoerm serve`` on the uninterrupted run's model, ~150 requests (good, bad JSON, wrong
   fields, over-long text, lone surrogates, concurrent clients); counts status codes; no 5xx allowed.
4. **batch invariance**: the run's models loaded with a bf16 trunk (and as trained, float32): each of 20 chats
   scored alone and inside mixed batches; the max absolute reward difference and DMoERM route flips.

    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/probe_reliability.py --out runs/probe

prints a summary table and writes ``<out>/probe.json``. About 3-4 minutes on 2 shared CPU cores (35 CLI
subprocesses, 6 tiny training runs, two at a time). The findings are
measured, never asserted: the exit code is 0 whatever they are (1 only if the probe itself cannot run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"


def child_env() -> dict[str, str]:
    """Environment of every subprocess: this tree's sources first, offline, one thread per process."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmoerm.cli", *args]


# ------------------------------------------------------------------------------------------------ set-up
def setup(work: Path) -> dict[str, Path]:
    """Tiny backbone, the tiny job's data and config (tests/helpers.py's), and a saved single RM for eval."""
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_backbone
    from dmoerm.data import save_jsonl
    from dmoerm.experts import BackboneConfig
    from dmoerm.reward_model import RewardModel
    from helpers import job_config_dict, length_records

    work.mkdir(parents=True, exist_ok=True)
    backbone = build_tiny_backbone(work / "backbone")
    job = job_config_dict(work, backbone)
    job["output_dir"] = str(work / "bad_runs" / "unused")
    (work / "tiny.yaml").write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    save_jsonl(length_records(10, seed=3, category="code"), work / "eval_good.jsonl")
    bb = BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    RewardModel.create(bb).save_pretrained(work / "eval_rm")
    return {
        "backbone": Path(backbone),
        "config": work / "tiny.yaml",
        "train_data": work / "prefs.jsonl",
        "eval_data": work / "eval_good.jsonl",
        "eval_model": work / "eval_rm",
    }


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One bad input run through the CLI."""

    name: str
    """Short label, unique within the probe."""
    kind: str
    """``eval-data``, ``train-data`` or ``train-config``."""
    argv: list[str]
    """The ``dmoerm`` arguments (after ``python -m dmoerm.cli``)."""
    expect: list[str]
    """Regular expressions that must all match the output (stderr + stdout) for a clear error."""
    echoed: list[str] = field(default_factory=list)
    """Text the user typed (``--set`` overrides) that is removed from the output before matching."""


@dataclass
class CaseResult:
    name: str
    kind: str
    handled: bool
    returncode: int | None
    traceback: bool
    names_location: bool
    seconds: float
    message: str
    """The last error line (or the output's last line) of the run."""
    started_work: bool
    """Training or labelling had begun before the command stopped (a config checked late)."""


def _line_pattern(path: Path, line: int) -> str:
    name = re.escape(path.name)
    return rf"{name}:{line}\b|{name}\S*,? (at |on )?line {line}\b"


def _with_bad_line(good: Path, bad: Path, line: int, content: bytes) -> None:
    """``good``'s lines with line ``line`` (1-based) replaced by ``content``."""
    lines = good.read_bytes().splitlines(keepends=True)
    lines[line - 1] = content.rstrip(b"\n") + b"\n"
    bad.write_bytes(b"".join(lines))


def bad_data_files(folder: Path, good: Path, prefix: str, only: set[str] | None = None) -> list[tuple]:
    """Write the bad data files; ``[(name, path, expect patterns)]``. Each bad line sits among good ones."""
    folder.mkdir(parents=True, exist_ok=True)
    conv = b'[{"role": "user", "content": "what is two plus two"}]'
    rows: dict[str, tuple[int | None, bytes | None]] = {
        "malformed_json": (3, b'{"conversation": [{"role": "user", "content": "hi"}], "chosen": "a", '),
        "missing_field": (4, b'{"conversation": ' + conv + b', "chosen": "four"}'),
        "wrong_type": (5, b'{"conversation": ' + conv + b', "chosen": 4, "rejected": "five"}'),
        "lone_surrogate": (2, b'{"conversation": ' + conv + b', "chosen": "four \\ud800", "rejected": "5"}'),
        "non_utf8": (6, b'{"conversation": ' + conv + b', "chosen": "four \xff\xfe", "rejected": "five"}'),
        "duplicate_responses": (3, b'{"conversation": ' + conv + b', "chosen": "four", "rejected": "four"}'),
        "unknown_role": (
            2,
            b'{"conversation": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}',
        ),
        "not_an_object": (4, b'["conversation", "chosen", "rejected"]'),
        "ranks_mismatch": (
            3,
            b'{"conversation": ' + conv + b', "responses": ["4", "5"], "ranks": [0, 1, 2]}',
        ),
        "empty_file": (None, b""),
        "blank_only_file": (None, b"\n   \n\t\n"),
        "missing_file": (None, None),
    }
    out = []
    for name, (line, content) in rows.items():
        if only is not None and name not in only:
            continue
        path = folder / f"{prefix}_{name}.jsonl"
        if content is None:
            expect = [re.escape(path.name)]  # never written: the message must name the path
        elif line is None:
            path.write_bytes(content)
            expect = [re.escape(path.name)]
        else:
            _with_bad_line(good, path, line, content)
            expect = [_line_pattern(path, line)]
        out.append((name, path, expect))
    return out


TRAIN_DATA_CASES = {
    "malformed_json",
    "lone_surrogate",
    "non_utf8",
    "empty_file",
    "blank_only_file",
    "missing_field",
}
"""The bad data files also run through ``dmoerm train``."""


def data_cases(work: Path, files: dict[str, Path], train: bool = True, only: set[str] | None = None):
    """``dmoerm eval`` (and ``dmoerm train``) on every bad data file."""
    import yaml

    cases = []
    for name, path, expect in bad_data_files(work / "bad_data", files["eval_data"], "eval", only):
        argv = ["eval", "--model", str(files["eval_model"]), "--data", str(path), "--n-resamples", "10"]
        cases.append(Case(f"eval: {name}", "eval-data", argv, expect))
    if not train:
        return cases
    base = yaml.safe_load(files["config"].read_text(encoding="utf-8"))
    # train reads data with the same loader as eval: the cases the issue saw differ there, not all again.
    train_only = TRAIN_DATA_CASES if only is None else only & TRAIN_DATA_CASES
    for name, path, expect in bad_data_files(work / "bad_data", files["train_data"], "train", train_only):
        job = dict(base, output_dir=str(work / "bad_runs" / f"data_{name}"))
        job["data"] = dict(base["data"], sources=[str(path)])
        config = work / "bad_configs" / f"data_{name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
        cases.append(
            Case(f"train: {name}", "train-data", ["train", "--config", str(config), "--no-progress"], expect)
        )
    return cases


def config_cases(work: Path, files: dict[str, Path]) -> list[Case]:
    """``dmoerm train`` with bad ``--set`` overrides and bad config files."""
    import yaml

    base = yaml.safe_load(files["config"].read_text(encoding="utf-8"))
    folder = work / "bad_configs"
    folder.mkdir(parents=True, exist_ok=True)
    overrides = {
        "learning_rate=abc": ("phase1.learning_rate=abc", r"learning_rate"),
        "batch_size=2.5": ("phase1.batch_size=2.5", r"batch_size"),
        "phase1=3": ("phase1=3", r"phase1"),
        "labels.judge.bogus": ("labels.judge.bogus=1", r"bogus"),
        "baseline=yes_please": ("baseline=yes_please", r"baseline"),
        "min_labels=-1": ("labels.min_labels=-1", r"min_labels"),
        "ensemble_size=2.5": ("ensemble_size=2.5", r"ensemble_size"),
        "sources as a string": ("data.sources=/path/file.jsonl", r"sources|/path/file\.jsonl"),
        "router.epochs=-1": ("router.epochs=-1", r"epochs"),
        "trunk_dtype=float8": ("model.trunk_dtype=float8", r"trunk_dtype"),
        "unknown backbone": ("model.backbone=no-such/model", r"no-such/model"),
        "missing backbone folder": (
            f"model.backbone={work / 'no_such_folder'}",
            re.escape(str(work / "no_such_folder")),
        ),
    }
    cases = []
    for i, (name, (item, pattern)) in enumerate(overrides.items()):
        out_dir = work / "bad_runs" / f"config_{i}"
        argv = ["train", "--config", str(files["config"]), "--output-dir", str(out_dir), "--no-progress"]
        cases.append(Case(f"config: {name}", "train-config", argv + ["--set", item], [pattern], [item]))
    argv = ["train", "--config", str(files["config"]), "--no-progress", "--set", "phase1.epochs"]
    cases.append(Case("config: --set without =", "train-config", argv, [r"phase1\.epochs"]))

    def file_case(name: str, text: str, expect: list[str]) -> Path:
        path = folder / f"config_file_{len(cases)}.yaml"  # a neutral name: it must not spell the field
        path.write_text(text, encoding="utf-8")
        cases.append(
            Case(f"config: {name}", "train-config", ["train", "--config", str(path), "--no-progress"], expect)
        )
        return path

    job = dict(base, output_dir=str(work / "bad_runs" / "config_file"))
    file_case('epochs: "3"', yaml.safe_dump(dict(job, phase1=dict(base["phase1"], epochs="3"))), [r"epochs"])
    text = yaml.safe_dump(job, sort_keys=False)
    broken = text.replace("phase3:\n", "phase3: [oops\n", 1)
    line = broken.splitlines().index("phase3: [oops") + 1
    name = f"config_file_{len(cases)}.yaml"
    file_case(
        "YAML syntax error", broken, [re.escape(name), rf"line ({line}|{line + 1})\b|:({line}|{line + 1})\b"]
    )
    file_case("not a mapping", "- just\n- a list\n", [r"mapping|dict"])
    missing = folder / "no_such_config.yaml"
    cases.append(
        Case(
            "config: missing file",
            "train-config",
            ["train", "--config", str(missing)],
            [re.escape(missing.name)],
        )
    )
    return cases


def run_cli_case(case: Case, timeout: float = 90.0) -> CaseResult:
    """Run one case through the real CLI and judge its error (see the module docstring)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cli(*case.argv),
            capture_output=True,
            text=True,
            errors="replace",
            env=child_env(),
            timeout=timeout,
        )
        rc, output = proc.returncode, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired as e:
        rc = None
        output = (
            (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        )
        output += f"\n(timed out after {timeout:.0f}s)"
    return judge(case, rc, output, time.perf_counter() - t0)


def judge(case: Case, returncode: int | None, output: str, seconds: float = 0.0) -> CaseResult:
    """Handled: a nonzero exit, no traceback, and the error line(s) match every pattern of ``case.expect``."""
    traceback = TRACEBACK in output
    # The error itself must say where: an INFO line naming the file just before a vague error does not count.
    errors = [ln for ln in output.splitlines() if " ERROR " in ln]
    judged = "\n".join(errors or output.strip().splitlines()[-5:])
    for text in case.echoed:
        judged = judged.replace(text, "")
    names = all(re.search(p, judged) for p in case.expect)
    message = (errors[-1] if errors else (output.strip().splitlines() or [""])[-1]).strip()
    handled = returncode not in (0, None) and not traceback and names
    started = bool(re.search(r" INFO dmoerm\.(training|labelling|router)", output))
    return CaseResult(
        case.name, case.kind, handled, returncode, traceback, names, round(seconds, 1), message[:300], started
    )


def probe_bad_inputs(work: Path, files: dict[str, Path], jobs: int, timeout: float) -> dict:
    cases = data_cases(work, files) + config_cases(work, files)
    print(f"[bad inputs] {len(cases)} cases through the CLI, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda c: run_cli_case(c, timeout), cases))
    for r in results:
        status = ("late" if r.started_work else "ok  ") if r.handled else "BAD "
        why = "" if r.handled else f" (rc={r.returncode}, traceback={r.traceback}, names={r.names_location})"
        print(f"  {status} {r.name:40s} {r.seconds:5.1f}s{why}  {r.message[:150]}", flush=True)
    return {
        "tried": len(results),
        "handled": sum(r.handled for r in results),
        "unhandled": [r.name for r in results if not r.handled],
        "handled_after_work_began": [r.name for r in results if r.handled and r.started_work],
        "cases": [asdict(r) for r in results],
    }


# ------------------------------------------------------------------------------------------------ kills
def _stages(run: Path) -> list[str]:
    try:
        return [k for k in json.loads((run / "state.json").read_text()) if not k.startswith("_")]
    except (OSError, ValueError):
        return []


def _train(config: Path, run: Path, log: Path, kill_after: int | None = None, timeout: float = 300.0):
    """Run ``dmoerm train``; with ``kill_after`` SIGKILL it once that many stages are recorded.
    Returns (returncode, seconds, stages at the kill or the end)."""
    argv = cli("train", "--config", str(config), "--output-dir", str(run), "--no-progress")
    t0 = time.perf_counter()
    with log.open("ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        try:
            while kill_after is not None and proc.poll() is None and time.perf_counter() - t0 < timeout:
                if len(_stages(run)) >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, time.perf_counter() - t0, _stages(run)


def test_rewards(run: Path) -> dict[str, list[float]]:
    """The run's DMoERM and single RM rewards on its own test split (every response of every record)."""
    from dmoerm.data import load_file
    from dmoerm.model import load_model

    records = load_file(run / "splits" / "test.jsonl")
    convs = [r.conversation for r in records for _ in r.responses]
    responses = [resp for r in records for resp in r.responses]
    out = {}
    for name in ("model", "baseline"):
        if (run / name).exists():
            out[name] = [o.reward for o in load_model(run / name).score(convs, responses, batch_size=8)]
    return out


def eval_agreements(run: Path) -> dict[str, float]:
    out = {}
    for path in sorted((run / "eval").glob("*/eval.json")):
        out[path.parent.name] = json.loads(path.read_text())["overall"]["agreement"]["value"]
    return out


def _max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    if set(a) != set(b) or any(len(a[k]) != len(b[k]) for k in a):
        return float("inf")
    return max((abs(x - y) for k in a for x, y in zip(a[k], b[k])), default=0.0)


def differing_files(a: Path, b: Path) -> dict[str, float]:
    """Weight files (``*.safetensors`` under ``model/`` and ``baseline/``) that differ between two runs, with
    the largest absolute difference of any of their tensors (inf: only in one run, or other tensor names)."""
    from safetensors.torch import load_file

    out: dict[str, float] = {}
    for part in ("model", "baseline"):
        names = {p.relative_to(a) for p in (a / part).rglob("*.safetensors") if "checkpoint" not in str(p)}
        names |= {p.relative_to(b) for p in (b / part).rglob("*.safetensors") if "checkpoint" not in str(p)}
        for name in sorted(names):
            if not (a / name).exists() or not (b / name).exists():
                out[str(name)] = float("inf")
                continue
            x, y = load_file(a / name), load_file(b / name)
            if set(x) != set(y):
                out[str(name)] = float("inf")
                continue
            diff = max((float((x[k].float() - y[k].float()).abs().max()) for k in x), default=0.0)
            if diff > 0:
                out[str(name)] = diff
    return out


def _fmt(diffs: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) or "none"


def _kill_and_rerun(config: Path, run: Path, log: Path, k: int) -> dict:
    rc_kill, _, done = _train(config, run, log, kill_after=k)
    rc, seconds, _ = _train(config, run, log)
    return {
        "kill_after_stages": k,
        "killed": rc_kill == -signal.SIGKILL,
        "stages_done_at_kill": done,
        "rerun_returncode": rc,
        "rerun_seconds": round(seconds, 1),
    }


def probe_kills(
    work: Path,
    files: dict[str, Path],
    kill_points: list[int],
    tolerance: float,
    control: bool,
    jobs: int,
    weight_tolerance: float = 1e-4,
) -> dict:
    """SIGKILL a tiny ``dmoerm train`` after ``k`` stages, rerun, compare with an uninterrupted run. With
    ``control``, a second uninterrupted run tells a resume's differences from the job's own nondeterminism.
    Runs go ``jobs`` at a time (each child uses one thread)."""
    log = work / "train.log"
    ref, again = work / "kills" / "uninterrupted", work / "kills" / "uninterrupted_again"
    print(
        f"[kills] uninterrupted run{' twice' if control else ''}, then kills after {kill_points} stages",
        flush=True,
    )
    with ThreadPoolExecutor(jobs) as pool:
        firsts = list(pool.map(lambda r: _train(files["config"], r, log), [ref, again][: 1 + control]))
        runs = list(
            pool.map(
                lambda k: _kill_and_rerun(files["config"], work / "kills" / f"kill_after_{k}", log, k),
                kill_points,
            )
        )
    rc, seconds, stages = firsts[0]
    if rc != 0:
        raise RuntimeError(f"the uninterrupted tiny run failed (rc={rc}); see {log}")
    out: dict = {"reference": {"seconds": round(seconds, 1), "stages": stages}, "tolerance": tolerance}
    out["weight_tolerance"] = weight_tolerance
    out.update(model=str(ref / "model"), baseline=str(ref / "baseline"))
    ref_rewards, ref_agreement = test_rewards(ref), eval_agreements(ref)
    out["reference_agreement"] = ref_agreement
    nondeterministic: set[str] = set()
    if control:
        rc = firsts[1][0]
        control_diff = differing_files(ref, again) if rc == 0 else {}
        nondeterministic = {f for f, d in control_diff.items() if d > weight_tolerance}
        out["control"] = {
            "returncode": rc,
            "max_test_reward_diff": _max_diff(test_rewards(again), ref_rewards) if rc == 0 else None,
            "differing_files": control_diff,
        }
        print(f"  control (a second uninterrupted run): {out['control']}", flush=True)
    for r in runs:
        run = work / "kills" / f"kill_after_{r['kill_after_stages']}"
        finished = r["rerun_returncode"] == 0
        r["max_test_reward_diff"] = _max_diff(test_rewards(run), ref_rewards) if finished else float("inf")
        r["agreement_equal"] = finished and eval_agreements(run) == ref_agreement
        r["differing_files"] = differing_files(ref, run) if finished else {}
        ok = r["killed"] and finished
        r["survived"] = ok and r["max_test_reward_diff"] <= tolerance and r["agreement_equal"]
        # The resume changed nothing that two uninterrupted runs do not change too.
        # (Float noise below weight_tolerance aside: batches of cached trunk states are composed differently.)
        big = {f for f, d in r["differing_files"].items() if d > weight_tolerance}
        r["survived_but_for_nondeterminism"] = ok and big <= nondeterministic
        done = r["stages_done_at_kill"]
        print(
            f"  kill after {r['kill_after_stages']} stages ({done[-1] if done else '-'}): killed={r['killed']} "
            f"rerun rc={r['rerun_returncode']} max reward diff={r['max_test_reward_diff']:.3g} agreements "
            f"equal={r['agreement_equal']} differing weights={_fmt(r['differing_files'])} -> "
            f"{'survived' if r['survived'] else 'NOT survived'}",
            flush=True,
        )
    out["runs"] = runs
    out["total"] = len(runs)
    out["survived"] = sum(r["survived"] for r in runs)
    out["survived_but_for_nondeterminism"] = sum(r["survived_but_for_nondeterminism"] for r in runs)
    return out


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_requests(n_good: int) -> list[tuple[str, str, str, object]]:
    """``[(expect, method, path, body)]``; expect is ``good`` (200), ``bad`` (4xx) or ``any`` (not 5xx).
    ``body`` is bytes sent as they are, or an object sent as JSON."""
    words = "the quick brown fox jumps over the lazy dog paris is the capital of france".split()
    reqs: list[tuple[str, str, str, object]] = []
    for i in range(n_good):
        n = 1 + i % 3
        items = [
            {
                "conversation": [{"role": "user", "content": " ".join(words[(i + j) % 7 :][:5]) + f" #{i}"}],
                "response": " ".join(words[: 2 + (i * 7 + j) % 12]),
            }
            for j in range(n)
        ]
        reqs.append(("good", "POST", "/score", {"items": items}))
        if i % 3 == 0:
            text = f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n{' '.join(words[: i % 10])}<|im_end|>\n"
            reqs.append(("good", "POST", "/get_reward", {"query": [text], "prompts": [""], "labels": [None]}))
            reqs.append(("good", "POST", "/classify", {"model": "rm", "input": text, "activation": False}))
    chat = [{"role": "user", "content": "hi"}]
    bad: list[tuple[str, object]] = [
        ("/score", b"{not json"),
        ("/score", b""),
        ("/score", b"\xff\xfe\x00 not utf-8"),
        ("/score", b"[" * 100_000 + b"]" * 100_000),
        ("/score", {"itemz": []}),
        ("/score", {"items": "not a list"}),
        ("/score", {"items": [{"response": "x"}]}),
        ("/score", {"items": [{"conversation": chat, "response": 5}]}),
        ("/score", {"items": [{"conversation": [{"role": "robot", "content": "x"}], "response": "y"}]}),
        ("/score", {"items": [{"conversation": [{"role": "user"}], "response": "y"}]}),
        ("/score", {"items": [{"conversation": chat, "response": "word " * 200_000}]}),
        (
            "/score",
            b'{"items": [{"conversation": [{"role": "user", "content": "hi"}], "response": "\\ud800"}]}',
        ),
        (
            "/score",
            b'{"items": [{"conversation": [{"role": "user", "content": "\\udfff x"}], "response": "ok"}]}',
        ),
        ("/score", {"items": [{"conversation": chat, "response": "x"}] * 600}),
        ("/get_reward", {"query": {"not": "a list"}}),
        ("/get_reward", {"query": [1, 2]}),
        ("/get_reward", {"query": ["word " * 400]}),
        ("/get_reward", {"query": ["x" * 5_000_000]}),
        ("/get_reward", b'{"query": ["\\ud800"]}'),
        ("/classify", {"model": "rm", "input": [1, 2, 3]}),
        ("/classify", {"model": "rm"}),
        ("/classify", b'{"model": "rm", "input": "\\ud83d"}'),
        ("/pooling", {"model": "rm", "input": {"a": 1}}),
        ("/no_such_path", {"items": []}),
    ]
    reqs += [("bad", "POST", path, body) for path, body in bad]
    reqs += [("bad", "GET", "/score", None), ("any", "POST", "/score", {"items": []})]
    reqs += [("good", "GET", "/health", None), ("good", "GET", "/stats", None)]
    reqs += [("good", "POST", "/pooling", {"model": "rm", "input": "hello there"})]
    reqs += [("good", "POST", "/get_reward", {"query": "one string: documented as a list of one"})]
    return reqs


def _short(body: object) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body)
    return text if len(text) <= 70 else text[:60] + f"... ({len(text)} chars)"


def _send(client, base: str, req) -> tuple[str, int | None, bool]:
    """(expect, status or None on a connection failure, body is JSON)."""
    expect, method, path, body = req
    kwargs = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    try:
        r = client.request(method, base + path, **kwargs)
    except Exception:  # a dropped connection is a finding, not a crash of the probe
        return expect, None, False
    try:
        r.json()
        is_json = True
    except ValueError:
        is_json = False
    return expect, r.status_code, is_json and TRACEBACK not in r.text


def probe_server(work: Path, model_dir: str, n_good: int, clients: int) -> dict:
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (work / "serve.log").open("wb")
    argv = cli(
        "serve", "--model-dir", model_dir, "--port", str(port), "--torch-threads", "1", "--max-wait-ms", "2"
    )
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    try:
        deadline = time.perf_counter() + 90
        with httpx.Client(timeout=60) as client:
            while time.perf_counter() < deadline:
                try:
                    if client.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"dmoerm serve exited with {proc.returncode}; see {work / 'serve.log'}"
                    )
                time.sleep(0.2)
            reqs = server_requests(n_good)
            print(f"[server] {len(reqs)} requests, {clients} concurrent clients", flush=True)
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(lambda q: _send(client, base, q), reqs))
            still_up = client.get(base + "/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    codes: dict[str, int] = {}
    for _, status, _ in answers:
        codes[str(status)] = codes.get(str(status), 0) + 1
    wrong = [
        f"{q[1]} {q[2]} {_short(q[3])} (expected {q[0]}): {status}"
        for q, (_, status, is_json) in zip(reqs, answers)
        if status is None
        or status >= 500
        or (q[0] == "good" and status != 200)
        or (q[0] == "bad" and not 400 <= status < 500)
        or not is_json
    ]
    n5xx = sum(1 for _, s, _ in answers if s is not None and s >= 500)
    print(
        f"  status codes {codes}; 5xx: {n5xx}; unexpected: {len(wrong)}; up at the end: {still_up}",
        flush=True,
    )
    for w in wrong:
        print(f"    {w}", flush=True)
    return {
        "requests": len(answers),
        "status_codes": codes,
        "5xx": n5xx,
        "connection_failures": codes.get("None", 0),
        "unexpected": wrong,
        "up_at_the_end": still_up,
        "exit_code": proc.returncode,
    }


# ------------------------------------------------------------------------------------------------ batch invariance
def _with_trunk_dtype(src: str, dst: Path, dtype: str) -> Path:
    """A copy of a model folder whose backbone config asks for ``dtype`` (the trunk the model runs)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint", "checkpoints", "*.png"))
    cfg = dst / "backbone_config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), trunk_dtype=dtype), indent=2))
    return dst


def _chats(train_data: Path, n: int):
    """``n`` (conversation, response) pairs of varied lengths, and long fillers to share their batches."""
    from dmoerm.data import load_file

    records = load_file(train_data)
    pairs = [(r.conversation, resp) for r in records[::5] for resp in r.responses][:n]
    fillers = [(r.conversation, " ".join(r.responses) * 3) for r in records[1:40:9]]
    return pairs, fillers


def batch_invariance(model, pairs, fillers) -> dict:
    """Max |reward alone - reward in a batch| over several mixed batches, and DMoERM route flips."""
    import random

    alone = [model.score([c], [r], batch_size=1)[0] for c, r in pairs]
    rng = random.Random(0)
    worst, flips, batches = 0.0, 0, 0
    for batch_size in (4, 7, len(pairs) + len(fillers)):
        order = list(range(len(pairs))) + [-1 - i for i in range(len(fillers))]
        rng.shuffle(order)
        convs = [pairs[i][0] if i >= 0 else fillers[-1 - i][0] for i in order]
        resps = [pairs[i][1] if i >= 0 else fillers[-1 - i][1] for i in order]
        outs = model.score(convs, resps, batch_size=batch_size)
        batches += (len(order) + batch_size - 1) // batch_size
        for i, out in zip(order, outs):
            if i >= 0:
                worst = max(worst, abs(out.reward - alone[i].reward))
                flips += out.category != alone[i].category
    return {"max_abs_diff": worst, "route_flips": flips, "chats": len(pairs), "batches": batches}


def probe_batch_invariance(work: Path, files: dict[str, Path], kills: dict, n_chats: int) -> dict:
    from dmoerm.model import load_model

    pairs, fillers = _chats(files["train_data"], n_chats)
    out = {}
    for dtype in ("bfloat16", "float32"):
        for name, src in (("single RM", kills["baseline"]), ("DMoERM", kills["model"])):
            folder = _with_trunk_dtype(
                src, work / "batch_invariance" / f"{name.replace(' ', '_')}_{dtype}", dtype
            )
            res = batch_invariance(load_model(folder), pairs, fillers)
            out[f"{name} ({dtype} trunk)"] = res
            print(
                f"[batch invariance] {name}, {dtype} trunk: max |diff| {res['max_abs_diff']:.3g}, "
                f"route flips {res['route_flips']}",
                flush=True,
            )
    return out


# ------------------------------------------------------------------------------------------------ main
def summary(result: dict) -> str:
    rows = []
    b, k, s, bi = (result.get(x) for x in ("bad_inputs", "kills", "server", "batch_invariance"))
    if b:
        rows.append(("bad inputs handled with a clear error", f"{b['handled']} / {b['tried']}"))
    if k:
        rows.append(("kills survived (SIGKILL, rerun, same test rewards)", f"{k['survived']} / {k['total']}"))
        if "control" in k:
            c = k["control"]
            rows.append(
                (
                    "two uninterrupted runs: max test reward diff",
                    f"{c['max_test_reward_diff']:.3g} "
                    f"(weights differing by > {k['weight_tolerance']:g}: "
                    f"{', '.join(f for f, d in c['differing_files'].items() if d > k['weight_tolerance']) or 'none'})",
                )
            )
            rows.append(
                (
                    f"kills survived but for that (and float noise < {k['weight_tolerance']:g})",
                    f"{k['survived_but_for_nondeterminism']} / {k['total']}",
                )
            )
    if s:
        rows.append(("server requests / 5xx", f"{s['requests']} / {s['5xx']}"))
        rows.append(("server answers not as expected", str(len(s["unexpected"]))))
    for name, r in (bi or {}).items():
        rows.append(
            (
                f"batch invariance max |diff|, {name}",
                f"{r['max_abs_diff']:.3g} ({r['route_flips']} route flips)",
            )
        )
    parts = ", ".join(f"{k} {v:.0f}" for k, v in result.get("seconds_per_part", {}).items())
    rows.append(("probe wall time", f"{result['seconds']:.0f} s ({parts})"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'check':{width}s} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {a:{width}s} | {v} |" for a, v in rows]
    if b and b["unhandled"]:
        lines.append("\nunhandled bad inputs: " + "; ".join(b["unhandled"]))
    if b and b["handled_after_work_began"]:
        lines.append("handled, but after training began: " + "; ".join(b["handled_after_work_began"]))
    if s and s["unexpected"]:
        lines.append("server answers not as expected: " + "; ".join(s["unexpected"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/probe", help="folder for probe.json and the probe's work files")
    p.add_argument("--parts", default="bad,kills,server,invariance", help="comma-separated parts to run")
    p.add_argument("--kill-points", default="2,7", help="stages recorded before each SIGKILL")
    p.add_argument("--jobs", type=int, default=2, help="bad-input CLI cases run at a time")
    p.add_argument(
        "--case-timeout", type=float, default=90.0, help="seconds before a CLI case counts as hung"
    )
    p.add_argument("--requests", type=int, default=90, help="good /score requests (plus ~60 others)")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--chats", type=int, default=20, help="chats of the batch-invariance check")
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a second uninterrupted run, to tell a resume's differences from the job's own nondeterminism",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-6, help="largest reward difference a resume may show"
    )
    args = p.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    files = setup(work)
    result: dict = {"command": " ".join(sys.argv)}
    seconds: dict[str, float] = {}
    if "bad" in parts:
        t1 = time.perf_counter()
        result["bad_inputs"] = probe_bad_inputs(work, files, args.jobs, args.case_timeout)
        seconds["bad inputs"] = round(time.perf_counter() - t1, 1)
    if parts & {"kills", "server", "invariance"}:
        # The uninterrupted run is the reference of the kills and the model of the server and invariance parts.
        t1 = time.perf_counter()
        points = [int(x) for x in args.kill_points.split(",") if x] if "kills" in parts else []
        kills = probe_kills(
            work, files, points, args.tolerance, control="kills" in parts and args.control, jobs=args.jobs
        )
        if "kills" in parts:
            result["kills"] = kills
        seconds["train runs and kills"] = round(time.perf_counter() - t1, 1)
    ref = work / "kills" / "uninterrupted"
    if "server" in parts:
        t1 = time.perf_counter()
        result["server"] = probe_server(work, str(ref / "model"), args.requests, args.clients)
        seconds["server"] = round(time.perf_counter() - t1, 1)
    if "invariance" in parts:
        paths = {"model": str(ref / "model"), "baseline": str(ref / "baseline")}
        t1 = time.perf_counter()
        result["batch_invariance"] = probe_batch_invariance(work, files, paths, args.chats)
        seconds["batch invariance"] = round(time.perf_counter() - t1, 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["seconds_per_part"] = seconds
    (out / "probe.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n" + summary(result))
    print(f"\nwrote {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
