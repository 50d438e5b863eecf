"""train_expert under accelerate's FSDP2 (``torch.distributed.run`` runs this file on 2 CPU processes; the
test runs :func:`expert_run` in its own process for the 1-process reference).

accelerate 1.15 picks FSDP only on GPU-like devices (on the CPU it falls back to DDP, ``MULTI_CPU``) and
DeepSpeed needs the ``deepspeed`` package, so the built accelerator's state is switched to each: first plain
DDP, then FSDP2 with accelerate's own FullyShardedDataParallelPlugin built from the launcher environment of the
shipped fsdp.yaml, then settings dmoerm refuses (FSDP1, a per-layer wrap) and DEEPSPEED with a ZeRO-3
DeepSpeedPlugin. Writes what each rank saw to
``rank<r>.pt``."""

import dataclasses
import os
import sys
from pathlib import Path

import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.training import loop, sharding
from dmoerm.training.distributed import process_accelerator
from dmoerm.training.loop import TrainConfig, score_items, train_expert
from dmoerm.training.trunk_cache import TrunkCache
from helpers import killed_in_epoch_two, length_records

# 10 training items in batches of 3: every batch leaves the ranks uneven shares, and the last (1 item) leaves
# rank 0 none; 3 dev items (1 and 2 a rank). Clipping at the default norm acts on every update here.
CONFIG = TrainConfig(epochs=2, batch_size=3, learning_rate=3e-3, early_stopping_patience=0, max_grad_norm=1.0)
# The top layers fine-tuned (finetune: full), with gradient accumulation and the length penalty.
FULL = dataclasses.replace(CONFIG, gradient_accumulation_steps=2, length_penalty=0.5)
BF16 = dataclasses.replace(CONFIG, mixed_precision="bf16")  # dmoerm's autocast of the top layers
FSDP_YAML = Path(__file__).parent.parent / "configs" / "accelerate" / "fsdp.yaml"
REFUSED = {  # launcher environment variables (accelerate config keys fsdp_version, fsdp_auto_wrap_policy)
    # FSDP1's plugin looks for a GPU for sync_module_states (the launcher's default): off on the CPU
    "fsdp1": {"FSDP_VERSION": "1", "FSDP_SYNC_MODULE_STATES": "false"},
    "layer_wrap": {
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    },
}


def launch_env(config_file=FSDP_YAML) -> dict[str, str]:
    """The FSDP environment variables ``accelerate launch --config_file config_file`` gives each process
    (accelerate's own launcher code), from which accelerate's FullyShardedDataParallelPlugin reads its settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_")}


def fsdp_plugin(env: dict[str, str]) -> FullyShardedDataParallelPlugin:
    """accelerate's FSDP plugin as a process launched with the environment ``env`` builds it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return FullyShardedDataParallelPlugin()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def fresh_bank(backbone: str, finetune: str = "lora") -> ExpertBank:
    torch.manual_seed(0)
    config = BackboneConfig(
        backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64, finetune=finetune
    )
    bank = ExpertBank(config, init_lora_weights=False)
    bank.add_expert("rm")
    return bank


def expert_weights(bank: ExpertBank) -> dict:
    return {n: p.detach().clone() for n, p in zip(bank_names(bank), bank.expert_parameters("rm"))}


def bank_names(bank: ExpertBank) -> list[str]:
    names = {id(p): n for n, p in bank.named_parameters()}
    return [names[id(p)] for p in bank.expert_parameters("rm")]


def expert_run(
    backbone: str,
    config: TrainConfig,
    checkpoint_dir=None,
    interrupt: bool = False,
    save_to=None,
    finetune: str = "lora",
) -> dict:
    """train_expert on a fresh tiny bank: its weights, losses, dev agreements, whether any bank parameter is
    left sharded, the test rewards of the trained bank and (``save_to``) of its saved-then-loaded copy.
    ``interrupt``: killed at the start of epoch 2 (after epoch 1's checkpoint), then rerun on a fresh bank."""
    bank = fresh_bank(backbone, finetune)
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(16, seed=3)]
    train, dev, test = items[:10], items[10:13], items[13:]
    if interrupt:
        killed_in_epoch_two(
            lambda: train_expert(bank, "rm", train, dev, config, TrunkCache(), checkpoint_dir)
        )
        bank = fresh_bank(backbone, finetune)
    result = train_expert(bank, "rm", train, dev, config, TrunkCache(), checkpoint_dir)
    from torch.distributed.tensor import DTensor

    found = {
        "weights": expert_weights(bank),
        "loss": torch.tensor(result.history["loss"]),
        "dev": torch.tensor(result.history["dev_agreement"]),
        "bank_class": type(bank).__name__,
        "sharded": [n for n, p in bank.named_parameters() if isinstance(p, DTensor)],
        "scores": torch.tensor(score_items(bank, "rm", test, TrunkCache())),
    }
    if save_to is not None:
        bank.save(save_to)
        loaded = ExpertBank.load(save_to)
        found["loaded_scores"] = torch.tensor(score_items(loaded, "rm", test, TrunkCache()))
    return found


PREPARED: list[dict] = []


class RecordingShardedExpert(sharding.ShardedExpert):
    """What FSDP2 made of each training view: the unit's class and the trained weights' local and whole sizes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        PREPARED.append(
            {
                "fsdp_module": isinstance(self.model, FSDPModule),
                "dtensors": all(isinstance(p, DTensor) for p in self.params),
                "local": sum(p.to_local().numel() for p in self.params),
                "whole": sum(p.numel() for p in self.params),
            }
        )


def switch_to(accelerator, kind: str, env: dict[str, str] | None = None) -> None:
    """The accelerator's state as ``accelerate launch`` would build it on GPUs: FSDP with the launcher
    environment ``env``, or DeepSpeed ZeRO-3."""
    state = accelerator.state
    if kind == "fsdp":
        state.fsdp_plugin = fsdp_plugin(env)
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    else:
        state.deepspeed_plugins = DeepSpeedPlugin(zero_stage=3)
        PartialState().distributed_type = state.distributed_type = DistributedType.DEEPSPEED


def refused(backbone: str) -> dict:
    """train_expert on a fresh bank: the error it raised, and whether the bank was left as it was."""
    bank = fresh_bank(backbone)
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(6, seed=3)]
    error = ""
    try:
        train_expert(bank, "rm", items[:4], items[4:], TrainConfig(epochs=1, batch_size=2), TrunkCache())
    except ValueError as e:
        error = str(e)
    return {
        "error": error,
        "bank_class": type(bank).__name__,
        "unchanged": all(torch.equal(before[n], p) for n, p in bank.named_parameters()),
    }


if __name__ == "__main__":
    backbone, out = sys.argv[1], sys.argv[2]
    accelerator = process_accelerator()
    rank = accelerator.process_index
    assert accelerator.distributed_type == DistributedType.MULTI_CPU and accelerator.num_processes == 2
    # What DDP gives, for FSDP2 to equal.
    found = {
        "ddp": expert_run(backbone, CONFIG),
        "ddp_full": expert_run(backbone, FULL, finetune="full"),
        "ddp_bf16": expert_run(backbone, BF16),
    }
    shipped = launch_env()
    switch_to(accelerator, "fsdp", shipped)
    loop.ShardedExpert = RecordingShardedExpert
    assert accelerator.is_fsdp2
    found |= {
        "clip": expert_run(backbone, CONFIG, f"{out}/clip", save_to=f"{out}/bank{rank}"),
        "noclip": expert_run(backbone, dataclasses.replace(CONFIG, max_grad_norm=0.0)),
        "resumed": expert_run(backbone, CONFIG, f"{out}/resumed", interrupt=True),
        "full": expert_run(backbone, FULL, finetune="full"),
        "bf16": expert_run(backbone, BF16),
    }
    for kind, settings in REFUSED.items():
        switch_to(accelerator, "fsdp", shipped | settings)
        found[kind] = refused(backbone)
    switch_to(accelerator, "zero3")
    found["zero3"] = refused(backbone)
    found["prepared"] = PREPARED
    torch.save(found, f"{out}/rank{rank}.pt")
