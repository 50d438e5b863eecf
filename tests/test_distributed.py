"""Data parallelism with the same global batch: two CPU processes (gloo, through accelerate) end with the same
weights as one process, for phase 1 (train_expert, with the length penalty and gradient accumulation), the
router, phase 3 and the single reward model; both ranks alike; a resumed 2-process run equals a straight one.
train_expert under FSDP2 too, and the FSDP settings it cannot train under are named before any work."""

import dataclasses
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import single_rm_weights, train_all
from fsdp_worker import REFUSED

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
def test_train_expert_under_fsdp2_trains_like_ddp_and_one_process_and_hands_back_a_whole_bank(
    tiny_backbone, tmp_path, one_torch_thread
):
    """train_expert under accelerate's FSDP2 with the shipped fsdp.yaml (2 gloo processes: tests/fsdp_worker.py)
    ends with the same weights on both ranks, as DDP on the same 2 processes (also with finetune: full,
    gradient accumulation and the length penalty, and with bf16 autocast) and as one process with the same
    global batch (with and without clipping). The bank handed back holds plain tensors, its saved and loaded
    copy scores the same, a run killed after epoch 1 resumes to the straight run's weights, and FSDP1, a
    per-layer wrap and ZeRO-3 stop on every rank before the bank is touched."""
    from fsdp_worker import CONFIG, expert_run, expert_weights, fresh_bank

    r0, r1 = _two_processes(tiny_backbone, tmp_path, "fsdp_worker.py")
    for run in ("ddp", "ddp_full", "ddp_bf16", "clip", "noclip", "resumed", "full", "bf16"):
        assert _max_diff(r0[run]["weights"], r1[run]["weights"]) == 0.0, run  # the ranks are identical
        assert r0[run]["sharded"] == r1[run]["sharded"] == [], run  # no DTensor left in the bank
        assert r0[run]["bank_class"] == r1[run]["bank_class"] == "ExpertBank", run
    # FSDP2 did shard: each training view was an FSDP unit whose trained weights were DTensors, about half of
    # each on a rank (6 runs: clip, noclip, resumed twice, full, bf16).
    for found in (r0, r1):
        assert len(found["prepared"]) == 6
        for seen in found["prepared"]:
            assert seen["fsdp_module"] and seen["dtensors"], seen
            assert 0.4 * seen["whole"] <= seen["local"] <= 0.6 * seen["whole"], seen
    noclip = dataclasses.replace(CONFIG, max_grad_norm=0.0)
    one = {"clip": expert_run(tiny_backbone, CONFIG), "noclip": expert_run(tiny_backbone, noclip)}
    diffs = {
        "fsdp2 vs ddp (2 processes)": _max_diff(r0["clip"]["weights"], r0["ddp"]["weights"]),
        "finetune full, fsdp2 vs ddp": _max_diff(r0["full"]["weights"], r0["ddp_full"]["weights"]),
        "bf16 autocast, fsdp2 vs ddp": _max_diff(r0["bf16"]["weights"], r0["ddp_bf16"]["weights"]),
        **{f"{run} weights": _max_diff(one[run]["weights"], r0[run]["weights"]) for run in one},
        **{f"{run} test rewards": _max_diff(one[run]["scores"], r0[run]["scores"]) for run in one},
        **{f"{run} losses": _max_diff(one[run]["loss"], r0[run]["loss"]) for run in one},
    }
    print("max abs difference, FSDP2 on 2 processes vs:", diffs)
    assert all(d <= 1e-6 for k, d in diffs.items() if "vs ddp" in k), diffs
    assert all(d <= ATOL for k, d in diffs.items() if k != "clip weights"), diffs
    assert _max_diff(r0["bf16"]["weights"], r0["clip"]["weights"]) > 1e-4  # bf16 did autocast
    # With clipping, Adam turns the data-parallel summation order's rounding in a few near-zero LoRA-B gradient
    # entries into larger steps; DDP on the same 2 processes lands on the same weights as FSDP2 (above).
    assert diffs["clip weights"] <= 5e-5, diffs
    assert torch.equal(one["clip"]["dev"], r0["clip"]["dev"])  # dev scored on each rank's share of the bank
    # Clipping acted, and training moved the weights (no comparison between untrained models).
    assert _max_diff(r0["clip"]["weights"], r0["noclip"]["weights"]) > 1e-3
    assert _max_diff(r0["clip"]["weights"], expert_weights(fresh_bank(tiny_backbone))) > 1e-3
    assert _max_diff(r0["full"]["weights"], expert_weights(fresh_bank(tiny_backbone, "full"))) > 1e-3
    # A kill after epoch 1's checkpoint (whole weights and optimizer state), rerun: the straight run's weights.
    assert _max_diff(r0["resumed"]["weights"], r0["clip"]["weights"]) <= 1e-6
    for found in (r0, r1):  # ExpertBank.save then load on each rank: the same test rewards
        assert torch.equal(found["clip"]["loaded_scores"], found["clip"]["scores"])
    stops = {
        "fsdp1": "fsdp_version: 1 is not supported",
        "layer_wrap": "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP is not supported, use NO_WRAP",
        "zero3": "distributed_type DeepSpeed ZeRO-3: sharding the expert bank's weights is not supported",
    }
    for rank, found in enumerate((r0, r1)):
        for kind, expected in stops.items():
            error = found[kind]["error"]
            assert expected in error and "docs/scaling.md" in error, (rank, kind, error)
            assert found[kind]["bank_class"] == "ExpertBank" and found[kind]["unchanged"], (rank, kind)


def _fsdp_launch(**env):
    """An accelerator-like launch under the shipped fsdp.yaml's FSDP plugin, launcher variables ``env`` changed."""
    from types import SimpleNamespace

    from fsdp_worker import fsdp_plugin, launch_env

    state = SimpleNamespace(fsdp_plugin=fsdp_plugin(launch_env() | env), deepspeed_plugin=None)
    return SimpleNamespace(distributed_type="FSDP", state=state, mixed_precision="no")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (REFUSED["fsdp1"], "fsdp_version: 1 is not supported, use 2"),
        (
            {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
            "fsdp_auto_wrap_policy: SIZE_BASED_WRAP is not supported",
        ),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading: true is not supported"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing: true is not supported"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true is not supported"),
        ({"FSDP_IGNORED_MODULES": "heads"}, "fsdp_ignored_modules: not supported"),
    ],
)
def test_each_unsupported_fsdp_setting_is_named(env, message):
    """The shipped fsdp.yaml passes the check (as accelerate's launcher hands it to the plugin); each setting
    dmoerm cannot train under raises ValueError naming its accelerate config key."""
    from dmoerm.training.sharding import check_sharding

    check_sharding(_fsdp_launch())
    with pytest.raises(ValueError, match=re.escape(message)):
        check_sharding(_fsdp_launch(**env))


def test_fsdp_with_accelerate_mixed_precision_is_refused():
    from dmoerm.training.sharding import check_sharding

    bf16 = _fsdp_launch()
    bf16.mixed_precision = "bf16"
    with pytest.raises(ValueError, match="mixed_precision: 'bf16' in the accelerate config is not supported"):
        check_sharding(bf16)


def test_train_expert_refuses_a_bad_fsdp_setting_before_touching_the_bank(tiny_backbone, monkeypatch):
    from dmoerm.training import loop
    from fsdp_worker import refused

    monkeypatch.setattr(loop, "process_accelerator", lambda: _fsdp_launch(**REFUSED["fsdp1"]))
    found = refused(tiny_backbone)
    assert "accelerate distributed_type FSDP: unsupported settings" in found["error"]
    assert "fsdp_version: 1 is not supported" in found["error"] and found["unchanged"]


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
        assert config.mixed_precision in ("no", None), (
            path.name
        )  # None: the DeepSpeed ones (accelerate refuses it)
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
    """`dmoerm train` under an FSDP launch dmoerm cannot train under (FSDP1) stops before its first stage (not
    after the router and the labels, where train_expert would first see it) and writes no run folder."""
    from dmoerm.pipeline import run as pipeline_run
    from dmoerm.pipeline import run_pipeline
    from helpers import job_config

    fsdp1 = _fsdp_launch(**REFUSED["fsdp1"])
    monkeypatch.setattr(pipeline_run, "process_accelerator", lambda: fsdp1)
    config = job_config(tmp_path, tiny_backbone)
    with pytest.raises(ValueError, match="distributed_type FSDP: unsupported settings .* fsdp_version: 1"):
        run_pipeline(config, progress=False)
    assert not (tmp_path / "run").exists()


# DeepSpeed ZeRO-2 and ZeRO-3 (tests/deepspeed_worker.py). The training tests need the deepspeed package (the
# `deepspeed` extra); the checks of the DeepSpeed config run without it.
ROOT = Path(__file__).parent.parent
ZERO2_YAML = ROOT / "configs" / "accelerate" / "deepspeed-zero2.yaml"
ZERO3_YAML = ROOT / "configs" / "accelerate" / "deepspeed-zero3.yaml"


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="the deepspeed package is not installed (pip install -e '.[deepspeed]')",
)


def _accelerate_launch(config_file: Path, script: Path, *args: str, **env_extra: str):
    """``accelerate launch --config_file config_file --num_processes 2 script args`` from the repository root
    (the config's DeepSpeed JSON path is relative to it); the finished process."""
    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", "2", "--main_process_port", str(_free_port()), str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _zero_runs(tiny_backbone: str, out: Path, config_file: Path) -> tuple[dict, dict]:
    """tests/deepspeed_worker.py on 2 processes under ``config_file``; what each rank saved."""
    _accelerate_launch(config_file, Path(__file__).parent / "deepspeed_worker.py", tiny_backbone, str(out))
    return tuple(torch.load(out / f"rank{r}.pt") for r in (0, 1))


def _check_zero_runs(r0: dict, r1: dict, stage: int, tiny_backbone: str, runs: tuple[str, ...]) -> dict:
    """What every ZeRO stage must give (the tests below); the differences measured, by name."""
    from fsdp_worker import CONFIG, expert_run, expert_weights, fresh_bank

    assert r0["stage"] == r1["stage"] == stage
    for run in (*runs, "ddp", "ddp_full"):
        assert _max_diff(r0[run]["weights"], r1[run]["weights"]) == 0.0, run  # the ranks are identical
        assert r0[run]["bank_class"] == r1[run]["bank_class"] == "ExpertBank", run
    # Every run was a ZeRO engine of the launch's stage holding half of the trained weights' AdamW state on
    # each rank, with the train config's accumulation and clipping (FULL, the 4th, accumulates 2).
    for found in (r0, r1):
        prepared = found["prepared"]
        assert len(prepared) == len(runs) + 1  # the killed run and its rerun
        for seen in prepared:
            assert seen["engine"] == "DeepSpeedEngine" and seen["stage"] == stage, seen
            assert 0.45 * seen["whole"] <= seen["local"] <= 0.55 * seen["whole"], seen
            assert seen["settings"]["gradient_clipping"] == seen["gradient_clipping"], seen
            assert seen["settings"]["gradient_accumulation_steps"] == seen["gradient_accumulation_steps"], (
                seen
            )
        assert [p["gradient_accumulation_steps"] for p in prepared][:4] == [1, 1, 1, 2]
    one = expert_run(tiny_backbone, CONFIG)
    diffs = {
        f"zero{stage} vs ddp (2 processes)": _max_diff(r0["clip"]["weights"], r0["ddp"]["weights"]),
        f"finetune full, zero{stage} vs ddp": _max_diff(r0["full"]["weights"], r0["ddp_full"]["weights"]),
        "clip weights": _max_diff(one["weights"], r0["clip"]["weights"]),
        "clip test rewards": _max_diff(one["scores"], r0["clip"]["scores"]),
        "clip losses": _max_diff(one["loss"], r0["clip"]["loss"]),
    }
    assert all(d <= ATOL for k, d in diffs.items() if k != "clip weights"), diffs
    assert diffs["clip weights"] <= 5e-5, diffs  # as DDP and FSDP2 (above): rounding, amplified by Adam
    assert torch.equal(one["dev"], r0["clip"]["dev"])
    assert _max_diff(r0["clip"]["weights"], expert_weights(fresh_bank(tiny_backbone))) > 1e-3
    assert _max_diff(r0["full"]["weights"], expert_weights(fresh_bank(tiny_backbone, "full"))) > 1e-3
    # Killed after epoch 1's checkpoint (whole weights, AdamW state gathered from both partitions), rerun.
    assert _max_diff(r0["resumed"]["weights"], r0["clip"]["weights"]) <= 1e-6
    for found in (r0, r1):  # the bank handed back: ExpertBank.save then load, the same test rewards
        assert torch.equal(found["clip"]["loaded_scores"], found["clip"]["scores"])
    return diffs


@pytest.mark.slow
@needs_deepspeed
def test_train_expert_under_deepspeed_zero2_trains_like_ddp_and_one_process(
    tiny_backbone, tmp_path, one_torch_thread
):
    """train_expert under `accelerate launch` with the shipped deepspeed-zero2.yaml / ds-zero2.json on 2 CPU
    processes (DeepSpeed's CPU accelerator over gloo): each run is a ZeRO-2 engine whose AdamW state is half
    on each rank, filled from the train config (accumulation, clipping); both ranks end alike, as DDP on the
    same processes (also with finetune: full, accumulation 2 and the length penalty, and with bf16 autocast)
    and as one process with the same global batch. The bank handed back saves and loads to the same scores, a
    run killed after epoch 1 resumes to the straight run's weights, and a DeepSpeed JSON contradicting the
    train config, or casting the bank, stops on every rank before the bank is touched."""
    from fsdp_worker import CONFIG, expert_run

    r0, r1 = _zero_runs(tiny_backbone, tmp_path, ZERO2_YAML)
    diffs = _check_zero_runs(r0, r1, 2, tiny_backbone, ("clip", "resumed", "full", "noclip", "bf16"))
    assert _max_diff(r0["ddp_bf16"]["weights"], r1["ddp_bf16"]["weights"]) == 0.0
    one = expert_run(tiny_backbone, dataclasses.replace(CONFIG, max_grad_norm=0.0))
    diffs |= {
        "bf16 autocast, zero2 vs ddp": _max_diff(r0["bf16"]["weights"], r0["ddp_bf16"]["weights"]),
        "noclip weights": _max_diff(one["weights"], r0["noclip"]["weights"]),
        "noclip test rewards": _max_diff(one["scores"], r0["noclip"]["scores"]),
    }
    print("max abs difference, ZeRO-2 on 2 processes vs:", diffs)
    assert all(d <= 1e-6 for k, d in diffs.items() if "vs ddp" in k), diffs
    assert diffs["noclip weights"] <= ATOL and diffs["noclip test rewards"] <= ATOL, diffs
    assert [p["gradient_clipping"] for p in r0["prepared"]] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert _max_diff(r0["bf16"]["weights"], r0["clip"]["weights"]) > 1e-4  # bf16 did autocast
    assert _max_diff(r0["clip"]["weights"], r0["noclip"]["weights"]) > 1e-3  # clipping acted
    stops = {
        "mismatch": "gradient_accumulation_steps: 4 in the DeepSpeed config differs from the train config's "
        "gradient_accumulation_steps 1 (set it to auto",
        "cast": "bf16.enabled: true is not supported",
    }
    for rank, found in enumerate((r0, r1)):
        for kind, expected in stops.items():
            error = found[kind]["error"]
            assert expected in error and "docs/scaling.md" in error, (rank, kind, error)
            assert found[kind]["bank_class"] == "ExpertBank" and found[kind]["unchanged"], (rank, kind)


@pytest.mark.slow
@needs_deepspeed
def test_train_expert_under_deepspeed_zero3_partitions_only_the_trained_weights(
    tiny_backbone, tmp_path, one_torch_thread
):
    """train_expert under the shipped deepspeed-zero3.yaml / ds-zero3.json on 2 CPU processes: each run's
    trained weights (copies in a training view) are partitioned, about half on each rank, while the bank's own
    parameters never are; the weights gathered back equal DDP's on the same processes (also with finetune:
    full, accumulation 2 and the length penalty) and the 1-process run's; save then load scores the same, and
    a killed run resumes to the straight run's weights."""
    r0, r1 = _zero_runs(tiny_backbone, tmp_path, ZERO3_YAML)
    diffs = _check_zero_runs(r0, r1, 3, tiny_backbone, ("clip", "resumed", "full"))
    print("max abs difference, ZeRO-3 on 2 processes vs:", diffs)
    assert all(d <= ATOL for k, d in diffs.items() if "vs ddp" in k), diffs  # ZeRO-3 sums in its own order
    for found in (r0, r1):
        for seen in found["prepared"]:
            assert seen["bank_whole"] and seen["partitioned"] == seen["local"], seen


def _deepspeed_launch(stage: int = 2, **keys):
    """An accelerator-like DeepSpeed launch on 2 processes with the shipped ds-zero2.json, keys changed."""
    import json
    from types import SimpleNamespace

    ds = json.loads((ROOT / "configs" / "accelerate" / "ds-zero2.json").read_text()) | keys
    ds["zero_optimization"] = {**ds["zero_optimization"], "stage": stage}
    plugin = SimpleNamespace(deepspeed_config=ds, zero_stage=stage, zero3_init_flag=False)
    return SimpleNamespace(
        distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2,
        mixed_precision="no",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"bf16": {"enabled": True}}, "bf16.enabled: true is not supported"),
        ({"fp16": {"enabled": True}}, "fp16.enabled: true is not supported"),
        ({"optimizer": {"type": "AdamW"}}, "optimizer: not supported (dmoerm builds its own AdamW"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler: not supported"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "zero_optimization.offload_optimizer.device: cpu is not supported, use none",
        ),
    ],
)
def test_each_unsupported_deepspeed_key_is_named(keys, message):
    """The shipped ds-zero2.json passes the check, and ZeRO-3 with zero3_init_flag: false; each DeepSpeed key
    dmoerm cannot train under raises a ValueError naming it (no deepspeed package needed), and so does ZeRO-3
    with zero3_init_flag: true (transformers would load the backbone partitioned)."""
    from dmoerm.training.sharding import check_sharding

    check_sharding(_deepspeed_launch())
    check_sharding(_deepspeed_launch(stage=3))
    with pytest.raises(ValueError, match=r"distributed_type DeepSpeed: unsupported DeepSpeed config keys .*"
                       + re.escape(message)):  # fmt: skip
        check_sharding(_deepspeed_launch(**keys))
    init = _deepspeed_launch(stage=3)
    init.state.deepspeed_plugin.zero3_init_flag = True
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3: .* not supported with zero3_init_flag: true"):
        check_sharding(init)


def test_each_run_fills_the_deepspeed_config_from_its_train_config():
    """``auto`` accumulation and clipping take each run's train config (0: clipping off, as in dmoerm), the
    micro batch and global batch follow; an explicit value equal to the train config's passes, a different one
    raises naming both; the launch's own config is left as it was for the next run."""
    from dmoerm.training.loop import TrainConfig
    from dmoerm.training.sharding import deepspeed_settings

    def train(gas, clip):
        return TrainConfig(gradient_accumulation_steps=gas, max_grad_norm=clip, batch_size=8)

    launch = _deepspeed_launch()
    before = dict(launch.state.deepspeed_plugin.deepspeed_config)
    ds = deepspeed_settings(launch, train(2, 0.0))
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (2, 0.0)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (1, 4)
    assert launch.state.deepspeed_plugin.deepspeed_config == before
    assert (
        deepspeed_settings(_deepspeed_launch(gradient_clipping=0.5), train(1, 0.5))["gradient_clipping"]
        == 0.5
    )
    with pytest.raises(ValueError, match=re.escape("gradient_clipping: 1.0 in the DeepSpeed config differs from "
                                                   "the train config's max_grad_norm 0.5 (set it to auto")):  # fmt: skip
        deepspeed_settings(_deepspeed_launch(gradient_clipping=1.0), train(1, 0.5))


@pytest.fixture(scope="module")
def one_process_run(tiny_backbone, tmp_path_factory):
    """The tests' tiny job trained by `dmoerm train` in this process: its config file (run folder beside)."""
    from dmoerm.pipeline import PipelineConfig, run_pipeline
    from test_distributed_pipeline import _config_file

    one = _config_file(tmp_path_factory.mktemp("one_process_run"), tiny_backbone, "one")
    torch.set_num_threads(1)
    run_pipeline(PipelineConfig.from_file(one), progress=False)
    return one


_ALL_ZERO = pytest.mark.skipif(
    not os.environ.get("DMOERM_TEST_ALL_ZERO"),
    reason="set DMOERM_TEST_ALL_ZERO=1 to run it (16-25 s a stage); the train_expert ZeRO tests run by default",
)


@pytest.mark.slow
@needs_deepspeed
@_ALL_ZERO
@pytest.mark.parametrize("stage", [2, 3])
def test_dmoerm_train_under_deepspeed_zero_gives_the_one_process_model(
    stage, one_process_run, tiny_backbone, tmp_path
):
    """`dmoerm train` on 2 processes under `accelerate launch` with the shipped deepspeed-zero2.yaml (or
    deepspeed-zero3.yaml): every bank stage (warm start, phase 1, phase-2 experts, single RM) trains as a ZeRO
    engine of that stage, rank 0 alone writes (the write guard), and the saved model scores the test responses
    as the 1-process run's does, with the same files."""
    from test_distributed_pipeline import _config_file, _files, _test_records, _test_rewards

    one = one_process_run.with_suffix("")
    config = _config_file(tmp_path, tiny_backbone, f"zero{stage}")
    worker = Path(__file__).parent / "deepspeed_worker.py"
    args = ["dmoerm", "train", "--config", str(config), "--no-progress"]
    launch = ZERO2_YAML if stage == 2 else ZERO3_YAML
    proc = _accelerate_launch(launch, worker, *args, DMOERM_TEST_GUARD=str(config.with_suffix("")))
    assert "RANK-WRITE" not in proc.stderr, [ln for ln in proc.stderr.splitlines() if "RANK-WRITE" in ln]
    runs = re.findall(rf"ZERO-RUNS rank (\d): (\d+) stage {stage} (\d+)", proc.stderr)
    print(f"ZeRO-{stage} expert runs per rank (prepared, ZeRO-{stage} engines):", runs)
    assert sorted(r for r, _, _ in runs) == ["0", "1"] and all(n == m != "0" for _, n, m in runs), runs
    test = _test_records(one)
    diff = float((_test_rewards(one, test) - _test_rewards(config.with_suffix(""), test)).abs().max())
    print(f"max |reward difference|, 1 process vs 2 under ZeRO-{stage}, on the test responses:", diff)
    assert diff <= ATOL
    assert _files(one) == _files(config.with_suffix(""))
