"""Run by test_distributed.py under torch.distributed.run: a few DDP steps, then dump this rank's weights."""

import sys

import torch

from dmoerm.experts import BackboneConfig
from dmoerm.reward_model import RewardModel
from dmoerm.training.loop import TrainConfig
from dmoerm.training.single import train_reward_model
from helpers import length_records

backbone, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
model = RewardModel.create(config, init_lora_weights=False)
initial = {n: p.detach().clone() for n, p in model.bank.named_parameters() if "lora_" in n or "heads" in n}
train_reward_model(
    length_records(16),
    [],
    config,
    TrainConfig(epochs=1, batch_size=2, learning_rate=1e-2),
    f"{out}/run",
    model=model,
    progress=False,
)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
params = {n: p.detach().clone() for n, p in model.bank.named_parameters() if "lora_" in n or "heads" in n}
torch.save({"world": world, "params": params, "initial": initial}, f"{out}/rank{rank}.pt")
