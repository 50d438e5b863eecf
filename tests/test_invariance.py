"""Batch invariance (issue 14 item 1): a chat's reward does not depend on what else shares its batch.

With a bf16 trunk a padded batch changes the kernels' shapes and with them a row's states; the trunk now runs
each row alone (SplitBackbone.trunk), so scoring a chat alone or beside longer and shorter chats gives the
same reward to 1e-5 (the float32 top layers still run on padded batches, at float32 rounding).
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_backbone
from dmoerm.data import Message
from dmoerm.encoding import collate
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.model import DMoERM
from dmoerm.reward_model import RewardModel
from dmoerm.training.trunk_cache import TrunkCache
from helpers import WORDS, add_capability_experts, tiny_taxonomy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chat(n_words: int, seed: int) -> tuple[list[Message], str]:
    words = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words)]
    return [Message("user", f"question {seed}: " + " ".join(words[:4]))], " ".join(words)


# The chat under test, then chats longer and shorter than it (each batch pads it differently).
PROBE = _chat(12, 0)
OTHERS = [_chat(40, 1), _chat(3, 2), _chat(25, 3), _chat(12, 4), _chat(1, 5), _chat(60, 6)]


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory) -> str:
    """A tiny random Llama a little wider and deeper than ``tiny_backbone`` (hidden 128, 6 layers): at hidden 32
    this CPU's bf16 kernels happen to give equal rows for these shapes, at 128 a padded batch moves the probe's
    reward by about 1e-3 (before the fix)."""
    return build_tiny_backbone(tmp_path_factory.mktemp("wide_backbone"), hidden_size=128, num_layers=6)


def _bank(backbone: str) -> ExpertBank:
    torch.manual_seed(0)
    config = BackboneConfig(backbone=backbone, num_top_layers=1, trunk_dtype="bfloat16", max_length=128)
    return ExpertBank(config, init_lora_weights=False)  # random LoRA B: the adapters change the rewards


@pytest.fixture(scope="module")
def reward_model(wide_backbone) -> RewardModel:
    return RewardModel(_bank(wide_backbone))


@pytest.fixture(scope="module")
def dmoerm(wide_backbone) -> DMoERM:
    taxonomy = tiny_taxonomy()
    model = DMoERM(_bank(wide_backbone), taxonomy, ["code", "chat"])
    add_capability_experts(model, taxonomy)
    with torch.no_grad():
        model.router.head.bias.zero_()  # both categories are routed to by the random router's features
    model.requires_grad_(False)
    model.eval()
    return model


def _batches():
    """The probe alone, then in batches with longer, shorter and mixed chats (the probe at several rows)."""
    yield [PROBE]
    yield [PROBE, OTHERS[0]]
    yield [OTHERS[1], PROBE]
    yield [OTHERS[0], OTHERS[1], PROBE, OTHERS[2]]
    yield [*OTHERS, PROBE]
    yield [PROBE, PROBE, OTHERS[5]]


def test_reward_model_score_is_batch_invariant(reward_model):
    rewards = []
    for batch in _batches():
        out = reward_model.score([c for c, _ in batch], [r for _, r in batch], batch_size=16)
        rewards += [o.reward for o, chat in zip(out, batch) if chat is PROBE]
    assert len(rewards) == 7
    assert max(rewards) - min(rewards) <= 1e-5, rewards


def test_dmoerm_score_is_batch_invariant_and_routes_the_same(dmoerm):
    rewards, routes = [], set()
    for batch in _batches():
        out = dmoerm.score([c for c, _ in batch], [r for _, r in batch], batch_size=16)
        for o, chat in zip(out, batch):
            if chat is PROBE:
                rewards.append(o.reward)
                routes.add(o.category)
    assert len(rewards) == 7 and len(routes) == 1
    assert max(rewards) - min(rewards) <= 1e-5, rewards


def test_trunk_cache_states_are_batch_invariant(reward_model):
    bank = reward_model.bank
    probe = reward_model.encode(*PROBE)
    others = [reward_model.encode(c, r) for c, r in OTHERS]
    alone = TrunkCache().get(bank, [probe])[0]
    for batch in ([probe, *others], [others[0], others[1], probe], [*others[3:], probe, others[2]]):
        cache = TrunkCache()
        states = cache.get(bank, batch, batch_size=4)
        assert torch.equal(states[batch.index(probe)], alone)
    assert alone.dtype == torch.bfloat16 and alone.shape == (len(probe.input_ids), bank.hidden_size)


def test_trunk_runs_each_distinct_row_alone_without_padding(reward_model, monkeypatch):
    """Whatever the CPU's kernels do with shapes, the trunk only ever sees one unpadded row at a time."""
    backbone = reward_model.bank.backbone
    calls = []
    original = backbone.trunk_batched

    def spy(input_ids, attention_mask):
        calls.append((tuple(input_ids.shape), int(attention_mask.sum())))
        return original(input_ids, attention_mask)

    monkeypatch.setattr(backbone, "trunk_batched", spy)
    inputs = [reward_model.encode(c, r) for c, r in [PROBE, *OTHERS, PROBE]]
    batch = collate(inputs, reward_model.tokenizer.pad_token_id)
    backbone.trunk(batch["input_ids"], batch["attention_mask"])
    distinct = list(dict.fromkeys(e.input_ids for e in inputs))
    assert calls == [((1, len(ids)), len(ids)) for ids in distinct]


def test_trunk_rows_equal_the_padded_batch_up_to_rounding_and_zero_at_pads(reward_model):
    """Running rows alone changes only rounding, not what is computed: float32 rows equal the padded batch."""
    backbone = reward_model.bank.backbone
    inputs = [reward_model.encode(c, r) for c, r in [PROBE, *OTHERS]]
    batch = collate(inputs, reward_model.tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    saved = backbone.trunk_dtype
    try:
        backbone.to(torch.float32)
        backbone.trunk_dtype = torch.float32
        with torch.no_grad():
            rows, padded = backbone.trunk(ids, mask), backbone.trunk_batched(ids, mask)
    finally:
        backbone.trunk_dtype = saved
        decoder = backbone.decoder
        decoder.embed_tokens.to(saved)
        for layer in decoder.layers[: backbone.split]:
            layer.to(saved)
    real = mask.bool()
    assert torch.allclose(rows[real], padded[real], atol=1e-5)
    assert torch.count_nonzero(rows[~real]) == 0
