"""Data parallelism with the same global batch: two CPU processes (gloo, through accelerate) end with the same
weights as one process, for phase 1 (train_expert, with the length penalty and gradient accumulation), the
router, phase 3 and the single reward model; both ranks alike; a resumed 2-process run equals a straight one."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import single_rm_weights, train_all

ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tiny_backbone: str, out: Path, worker: str = "distributed_worker.py") -> tuple[dict, dict]:
    """``worker`` (a script beside this file) on 2 gloo processes; what each rank saved as rank<r>.pt."""
    here = Path(__file__).parent
    env = dict(
        os.environ, PYTHONPATH=f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(here / worker), tiny_backbone, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt") for r in (0, 1))


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys() and a
        return max(_max_diff(a[k], b[k]) for k in a)
    assert a.shape == b.shape
    return float((a - b).abs().max()) if a.numel() else 0.0


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tiny_backbone, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r0, r1 = _two_processes(tiny_backbone, tmp_path / "two")
    one = train_all(tiny_backbone, str(tmp_path / "one"), resume=False)
    assert r0["world"] == r1["world"] == 2
    for name in (
        "phase1",
        "phase1_loss",
        "phase1_dev",
        "router",
        "phase3",
        "phase3_margins",
        "single",
        "single_resumed",
    ):
        assert _max_diff(r0[name], r1[name]) == 0.0, name  # the ranks are identical
    # The first aggregator layer's bias is left out of the weights: on units active for every response its
    # gradient is 0 in exact arithmetic (ranking gradients sum to 0 over a pair), so Adam's normalised steps
    # follow rounding noise there (measured 2.6e-4 apart, every other aggregator weight 2e-7). It moves the
    # rewards nearly alike, so the pair margins agree to 1e-4 (measured 3e-5).
    one["phase3"].pop("mlp.0.bias"), r0["phase3"].pop("mlp.0.bias")
    margins = _max_diff(one.pop("phase3_margins"), r0["phase3_margins"])
    diffs = {name: _max_diff(one[name], r0[name]) for name in one}
    print("max abs difference, 1 vs 2 processes:", diffs, "phase-3 pair margins:", margins)
    assert all(d <= ATOL for d in diffs.values()), diffs
    assert margins <= 1e-4
    resumed = _max_diff(r0["single_resumed"], r0["single"])
    print("max abs difference, resumed vs straight (2 processes):", resumed)
    assert resumed <= 1e-6  # resume after epoch 1 = 2 epochs straight
    # Training moved the weights (the comparison is not between two untrained models).
    assert _max_diff(r0["single"], single_rm_weights(tiny_backbone)) > 1e-3
    # Rank 0 alone wrote the single RM's folder, and it is the trained model.
    assert (tmp_path / "two" / "single" / "train_result.json").exists()


@pytest.mark.slow
def test_train_expert_refuses_fsdp_and_zero3_before_sharding_the_bank(tiny_backbone, tmp_path):
    """Under FSDP and DeepSpeed ZeRO-3 (2 gloo processes, accelerate's FSDP2 and ZeRO-3 states:
    tests/fsdp_worker.py) train_expert stops on every rank with an error naming the gap before it prepares the
    bank, so no rank holds a sharded bank whose heads and adapters would be scored and saved in pieces
    (docs/scaling.md). Without the check, FSDP fails inside the first step instead."""
    for rank, found in enumerate(_two_processes(tiny_backbone, tmp_path, "fsdp_worker.py")):
        for kind, name in (("fsdp", "FSDP"), ("zero3", "DeepSpeed ZeRO-3")):
            error = found[kind]["error"]
            assert f"distributed_type {name}: sharding the expert bank's weights is not supported" in error
            assert "docs/scaling.md" in error and "ddp-1x8.yaml" in error
            assert found[kind]["bank_class"] == "ExpertBank" and found[kind]["unchanged"], (rank, kind)


def test_the_shipped_accelerate_configs_load_with_accelerate():
    """configs/accelerate/*.yaml parse with accelerate's own loader, leave precision to the dmoerm config, and
    the DeepSpeed ones point at a JSON file whose micro batch size is an integer (no dataloader is prepared)."""
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parent.parent
    kinds = {}
    for path in sorted((root / "configs" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = (
            str(config.distributed_type).split(".")[-1],
            config.num_machines,
            config.num_processes,
        )
        assert config.mixed_precision == "no", path.name
        if config.deepspeed_config:
            ds = json.loads((root / config.deepspeed_config["deepspeed_config_file"]).read_text())
            assert isinstance(ds["train_micro_batch_size_per_gpu"], int), path.name
    assert kinds == {
        "ddp-1x8": ("MULTI_GPU", 1, 8),
        "ddp-2x8": ("MULTI_GPU", 2, 16),
        "deepspeed-zero2": ("DEEPSPEED", 1, 8),
        "deepspeed-zero3": ("DEEPSPEED", 1, 8),
        "fsdp": ("FSDP", 1, 8),
    }


def test_the_pipeline_refuses_fsdp_before_any_work(tiny_backbone, tmp_path, monkeypatch):
    """`dmoerm train` under an FSDP launch stops before its first stage (not after the router and the labels,
    where train_expert would first see it) and writes no run folder."""
    from types import SimpleNamespace

    from dmoerm.pipeline import run as pipeline_run
    from dmoerm.pipeline import run_pipeline
    from helpers import job_config

    fsdp = SimpleNamespace(distributed_type="FSDP", state=SimpleNamespace(deepspeed_plugin=None))
    monkeypatch.setattr(pipeline_run, "process_accelerator", lambda: fsdp)
    config = job_config(tmp_path, tiny_backbone)
    with pytest.raises(ValueError, match="distributed_type FSDP: sharding the expert bank's weights"):
        run_pipeline(config, progress=False)
    assert not (tmp_path / "run").exists()
