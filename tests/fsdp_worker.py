"""train_expert under FSDP and DeepSpeed ZeRO-3 (``torch.distributed.run`` runs this file on 2 CPU processes).

accelerate 1.15 picks FSDP only on GPU-like devices (on the CPU it falls back to DDP, ``MULTI_CPU``) and
DeepSpeed needs the ``deepspeed`` package, so the built accelerator's state is switched to each: FSDP with the
shipped fsdp.yaml's settings in accelerate's own FullyShardedDataParallelPlugin (FSDP2: FSDP1's full state dict
segfaults on the CPU in torch 2.13), then DEEPSPEED with a ZeRO-3 DeepSpeedPlugin. Writes what each rank saw
to ``rank<r>.pt``."""

import sys

import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.training.distributed import process_accelerator
from dmoerm.training.loop import TrainConfig, train_expert
from dmoerm.training.trunk_cache import TrunkCache
from helpers import length_records


def switch_to(accelerator, kind: str) -> None:
    """The accelerator's state as ``accelerate launch`` with fsdp.yaml (``fsdp``) or deepspeed-zero3.yaml
    (``zero3``) would build it on GPUs."""
    state = accelerator.state
    if kind == "fsdp":
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            state_dict_type="FULL_STATE_DICT",
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            cpu_ram_efficient_loading=False,
        )
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    else:
        state.deepspeed_plugins = DeepSpeedPlugin(zero_stage=3)
        PartialState().distributed_type = state.distributed_type = DistributedType.DEEPSPEED


def attempt(backbone: str) -> dict:
    """train_expert on a fresh tiny bank: the error it raised, and whether the bank was left as it was."""
    torch.manual_seed(0)
    config = BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    bank = ExpertBank(config, init_lora_weights=False)
    bank.add_expert("rm")
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(6, seed=3)]
    error = ""
    try:
        train_expert(bank, "rm", items[:4], items[4:], TrainConfig(epochs=1, batch_size=2), TrunkCache())
    except ValueError as e:
        error = str(e)
    return {
        "error": error,
        "bank_class": type(bank).__name__,  # FSDPExpertBank once fully_shard ran on it
        "unchanged": all(torch.equal(before[n], p) for n, p in bank.named_parameters()),
    }


if __name__ == "__main__":
    backbone, out = sys.argv[1], sys.argv[2]
    accelerator = process_accelerator()
    found = {}
    for kind in ("fsdp", "zero3"):
        switch_to(accelerator, kind)
        assert accelerator.is_fsdp2 == (kind == "fsdp") and accelerator.num_processes == 2
        found[kind] = attempt(backbone)
    torch.save(found, f"{out}/rank{accelerator.process_index}.pt")
