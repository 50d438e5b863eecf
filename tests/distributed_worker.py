"""The data-parallel check's training runs, the same under 1 process (in the test's process) and under 2
(``torch.distributed.run`` runs this file): phase 1 with the length penalty and gradient accumulation, the
router, phase 3 and the single reward model, straight and interrupted-then-resumed. Every global batch size
leaves some rank with an uneven share, and the last phase-1 and phase-3 batch (1 item) leaves rank 0 none."""

import sys

import torch

from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.model import rm_expert
from dmoerm.reward_model import RewardModel
from dmoerm.training.loop import TrainConfig
from dmoerm.training.phases import (
    AggregatorTrainConfig,
    RouterTrainConfig,
    _aggregator_inputs,
    train_phase1,
    train_phase3,
    train_router,
)
from dmoerm.training.single import train_reward_model
from dmoerm.training.trunk_cache import TrunkCache
from helpers import killed_in_epoch_two, length_records
from test_dmoerm import make_model, route_examples

PHASE1 = TrainConfig(
    epochs=2, batch_size=3, learning_rate=5e-3, length_penalty=0.5, gradient_accumulation_steps=2,
    early_stopping_patience=1,
)  # fmt: skip
SINGLE = TrainConfig(epochs=2, batch_size=3, learning_rate=1e-2, early_stopping_patience=0)


def _backbone_config(backbone: str) -> BackboneConfig:
    return BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)


def _fresh_rm(backbone: str) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.create(_backbone_config(backbone), init_lora_weights=False)


def single_rm_weights(backbone: str, model: RewardModel | None = None) -> dict:
    """The trainable weights of the single reward model (untrained: a fresh one)."""
    model = model or _fresh_rm(backbone)
    return {n: p.detach().clone() for n, p in model.bank.named_parameters() if "lora_" in n or "heads" in n}


def _single_rm(backbone: str, folder: str, interrupt: bool = False) -> dict:
    model = _fresh_rm(backbone)
    data = (length_records(10, seed=1), length_records(3, seed=2), _backbone_config(backbone), SINGLE, folder)
    if interrupt:  # a crash at the start of epoch 2, after epoch 1's checkpoint, then a rerun resumes
        killed_in_epoch_two(lambda: train_reward_model(*data, model=model, progress=False))
        model = _fresh_rm(backbone)
    train_reward_model(*data, model=model, progress=False)
    return single_rm_weights(backbone, model)


def train_all(backbone: str, out: str, resume: bool) -> dict:
    """Trainable weights (and phase 1's losses) after each training function."""
    model = make_model(backbone)
    cache = TrunkCache()
    tok, n = model.tokenizer, model.max_length
    items = [encode_record(tok, r, n) for r in length_records(13, seed=3, category="code")]
    train, dev = items[:10], items[10:]
    found: dict = {}
    phase1 = train_phase1(model, "code", train, dev, PHASE1, cache, progress=False)
    found["phase1"] = {n: p.detach().clone() for n, p in model.bank.named_parameters() if "code__rm" in n}
    found["phase1_loss"] = torch.tensor(phase1.history["loss"])
    found["phase1_dev"] = torch.tensor(phase1.history["dev_agreement"])
    examples = route_examples(model)
    train_router(model, examples[:17], examples[17:], RouterTrainConfig(epochs=3, batch_size=5), cache, False)
    found["router"] = {k: v.clone() for k, v in model.router.state_dict().items()}
    # Phase 3 over an untrained phase-1 expert of a fresh model: the same inputs under 1 and 2 processes (phase
    # 1's own 1e-6 differences would reach it through Adam, whose steps on near-zero gradients are noise-led).
    fresh = make_model(backbone)
    fresh.bank.add_expert(rm_expert("code"))
    agg = AggregatorTrainConfig(epochs=3, batch_size=3, length_penalty=0.5, early_stopping_patience=2)
    train_phase3(fresh, "code", train, dev, agg, TrunkCache(), experts=[rm_expert("code")])
    aggregator = fresh.aggregators["code"]
    found["phase3"] = {k: v.clone() for k, v in aggregator.state_dict().items()}
    feats, scores, where, _ = _aggregator_inputs(fresh, [rm_expert("code")], items, TrunkCache())
    with torch.no_grad():
        rewards = aggregator(feats, scores)  # [N]
    found["phase3_margins"] = torch.stack(
        [rewards[w[b]] - rewards[w[c]] for w, item in zip(where, items) for b, c in item.pairs]
    )
    found["single"] = _single_rm(backbone, f"{out}/single")
    if resume:
        found["single_resumed"] = _single_rm(backbone, f"{out}/resumed", interrupt=True)
    return found


if __name__ == "__main__":
    backbone, out = sys.argv[1], sys.argv[2]
    found = train_all(backbone, out, resume=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save({"world": world, **found}, f"{out}/rank{rank}.pt")
