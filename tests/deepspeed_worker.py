"""train_expert under accelerate's DeepSpeed ZeRO-2 or ZeRO-3: ``accelerate launch --config_file
configs/accelerate/deepspeed-zero2.yaml --num_processes 2`` (or deepspeed-zero3.yaml) runs this file on 2 CPU
processes (DeepSpeed's CPU accelerator over gloo: :func:`dmoerm.training.distributed.process_accelerator`),
the accelerator built from the launcher's environment and the shipped ds-zero2.json (ds-zero3.json). After
the ZeRO runs the accelerator's state is switched to plain DDP (``MULTI_CPU``) on the same process group, for
the reference runs. Writes what each rank saw to ``rank<r>.pt``.

``deepspeed_worker.py dmoerm <args>`` runs ``dmoerm <args>`` instead (its CLI's ``main``), with the write guard
of tests/distributed_pipeline_worker.py (``DMOERM_TEST_GUARD``); at exit each rank prints ``ZERO-RUNS rank
<r>: <n> stage <s> <m>``: n expert runs prepared by DeepSpeed, m of them engines of the launch's ZeRO stage s."""

import dataclasses
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from dmoerm.training import sharding
from dmoerm.training.distributed import process_accelerator
from fsdp_worker import BF16, CONFIG, FULL, expert_run, refused

PREPARED: list[dict] = []


def _record(run, settings: dict) -> None:
    """What DeepSpeed made of a run: the engine's class, its ZeRO stage, the AdamW state's size on this rank
    (its fp32 partition) against the trained weights' whole size, and the filled config's numbers."""
    zero = run.zero
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    PREPARED.append(
        {
            "engine": type(run.model).__name__,
            "stage": run.model.zero_optimization_stage(),
            "local": sum(t.numel() for t in flats),
            "whole": sum(p.numel() for p in run.bank_params),
            "gradient_accumulation_steps": run.model.gradient_accumulation_steps(),
            "gradient_clipping": run.model.gradient_clipping(),
            "settings": {k: settings[k] for k in ("gradient_accumulation_steps", "gradient_clipping")},
        }
    )


class RecordingZeroExpert(sharding.ZeroExpert):
    def __init__(self, *args):
        super().__init__(*args)
        _record(self, args[5])


class RecordingZeroThreeExpert(sharding.ZeroThreeExpert):
    def __init__(self, *args):
        super().__init__(*args)
        _record(self, args[5])
        # ZeRO-3 partitioned the view's trained weights, not the bank's (each rank holds about half of each)
        PREPARED[-1]["partitioned"] = sum(p.ds_tensor.numel() for p in self.params)
        PREPARED[-1]["bank_whole"] = all(not hasattr(p, "ds_id") for p in self.bank_params)


def refused_with(accelerator, backbone: str, **keys) -> dict:
    """:func:`refused` with the launch's DeepSpeed config keys ``keys`` changed (restored after)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    saved = dict(config)
    config.update(keys)
    try:
        return refused(backbone)
    finally:
        config.clear()
        config.update(saved)


def dmoerm(args: list[str]) -> int:
    import atexit
    import os

    from distributed_pipeline_worker import RANK, _guard
    from dmoerm.cli import main

    if os.environ.get("DMOERM_TEST_GUARD") and RANK != 0:
        _guard(os.environ["DMOERM_TEST_GUARD"])
    sharding.ZeroExpert, sharding.ZeroThreeExpert = RecordingZeroExpert, RecordingZeroThreeExpert
    stage = process_accelerator().state.deepspeed_plugin.zero_stage

    def report() -> None:
        zero = sum(p["engine"] == "DeepSpeedEngine" and p["stage"] == stage for p in PREPARED)
        sys.stderr.write(f"ZERO-RUNS rank {RANK}: {len(PREPARED)} stage {stage} {zero}\n")

    atexit.register(report)
    return main(args)


if __name__ == "__main__":
    if sys.argv[1] == "dmoerm":
        sys.exit(dmoerm(sys.argv[2:]))
    backbone, out = sys.argv[1], sys.argv[2]
    accelerator = process_accelerator()
    rank, stage = accelerator.process_index, accelerator.state.deepspeed_plugin.zero_stage
    assert accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.num_processes == 2
    sharding.ZeroExpert, sharding.ZeroThreeExpert = RecordingZeroExpert, RecordingZeroThreeExpert
    found = {
        "stage": stage,
        "clip": expert_run(backbone, CONFIG, f"{out}/clip", save_to=f"{out}/bank{rank}"),
        "resumed": expert_run(backbone, CONFIG, f"{out}/resumed", interrupt=True),
        "full": expert_run(backbone, FULL, finetune="full"),
    }
    if stage == 2:
        found |= {
            "noclip": expert_run(backbone, dataclasses.replace(CONFIG, max_grad_norm=0.0)),
            "bf16": expert_run(backbone, BF16),
            "mismatch": refused_with(accelerator, backbone, gradient_accumulation_steps=4),
            "cast": refused_with(accelerator, backbone, bf16={"enabled": True}),
        }
    found["prepared"] = PREPARED
    # The same 2 processes as plain DDP, for ZeRO to equal.
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.MULTI_CPU
    found |= {"ddp": expert_run(backbone, CONFIG), "ddp_full": expert_run(backbone, FULL, finetune="full")}
    if stage == 2:
        found["ddp_bf16"] = expert_run(backbone, BF16)
    import torch

    torch.save(found, f"{out}/rank{rank}.pt")
