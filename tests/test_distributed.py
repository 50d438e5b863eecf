"""Two CPU processes (gloo) train through accelerate and end with identical weights."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_keeps_ranks_identical(tiny_backbone, tmp_path):
    here = Path(__file__).parent
    env = dict(
        os.environ, PYTHONPATH=f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(here / "distributed_worker.py"),
        tiny_backbone,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
    moved = [n for n, v in r0["params"].items() if not torch.equal(v, r0["initial"][n])]
    assert len(moved) == len(r0["params"])  # training moved every trainable weight, on both ranks alike
