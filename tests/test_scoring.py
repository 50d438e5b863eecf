"""The one scoring path (dmoerm.scoring): every public scoring entry gives what scoring each input alone gives,
and bit for bit what the loop it replaced gave on the same batches.

References are computed here independently: the trunk on one unpadded row, then ``bank(states, mask, expert)``
(or the DMoERM's forward, or ``all_experts_hidden``) on that one row. Batched scoring runs the float32 top
layers on padded batches, so it equals a row alone up to float32 rounding (1e-5, as tests/test_invariance.py);
the old loops, restated below on the same batches, are matched exactly.
"""

from __future__ import annotations

import pytest
import torch

from dmoerm.data import PreferenceRecord
from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.labelling.human import expert_agreement
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.model import DMoERM, capability_expert_name, new_dmoerm
from dmoerm.pipeline import score_cached
from dmoerm.reward_model import RewardModel
from dmoerm.scoring import (
    dmoerm_outputs,
    expert_rewards,
    expert_states,
    flatten,
    in_order,
    items_in_order,
    prompt_features,
    trunk_batches,
)
from dmoerm.training.loop import score_items
from dmoerm.training.trunk_cache import TrunkCache, pad_states
from helpers import add_capability_experts, length_records, tiny_taxonomy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5


@pytest.fixture(scope="module")
def dmoerm(tiny_backbone) -> DMoERM:
    """Two categories, every expert and aggregator random, LoRA B non-zero (the adapters change rewards)."""
    torch.manual_seed(0)
    config = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    taxonomy = tiny_taxonomy()
    model = new_dmoerm(config, taxonomy, ["code", "chat"], init_lora_weights=False)
    add_capability_experts(model, taxonomy)
    with torch.no_grad():
        model.router.head.bias.zero_()
        model.router.head.weight.mul_(50)  # both categories win some prompts
    model.bank.add_expert(RewardModel.EXPERT)
    model.requires_grad_(False)
    model.eval()
    return model


@pytest.fixture(scope="module")
def items(dmoerm):
    """Ranked items of several lengths; two items share a prompt (one route per prompt per call)."""
    records = length_records(7, seed=3)
    shared = PreferenceRecord.from_pair(
        records[0].conversation, "paris water", "the dog", source="t", uid="s"
    )
    return [encode_record(dmoerm.tokenizer, r, dmoerm.max_length) for r in [*records, shared]]


def _alone(bank, e):
    """Trunk states [1, T, H] and masks [1, T] of one input, unpadded."""
    ids = torch.tensor([e.input_ids])
    mask = torch.ones_like(ids)
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[0, : e.prompt_length] = 1
    return bank.trunk(ids, mask), mask, prompt_mask


def _reward_alone(bank, expert, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.tensor([float(bank(*_alone(bank, e)[:2], expert)[0]) for e in inputs])


def test_flatten_and_batch_plans(items):
    flat, where = flatten(items)
    assert flat == [e for item in items for e in item.inputs]
    assert [flat[w] for w in where] == [list(item.inputs) for item in items]
    assert in_order(5, 2) == [[0, 1], [2, 3], [4]]
    assert items_in_order(where, 3) == [list(range(0, 6)), list(range(6, 12)), list(range(12, 16))]
    assert flatten([]) == ([], []) and in_order(0, 4) == []


def test_trunk_batches_read_the_cache_or_run_the_trunk_alike(dmoerm, items):
    bank, (flat, _) = dmoerm.bank, flatten(items)
    cache = TrunkCache()
    seen = []
    for cached, fresh in zip(
        trunk_batches(bank, flat, cache, batch_size=3),
        trunk_batches(bank, flat, None, batch_size=3),
        strict=True,
    ):
        assert cached.index == fresh.index
        assert torch.equal(cached.attention_mask, fresh.attention_mask)
        assert torch.equal(cached.prompt_mask, fresh.prompt_mask)
        real = cached.attention_mask.bool()
        assert torch.equal(cached.states[real], fresh.states[real])  # the trunk runs each row alone
        lengths = [len(flat[i].input_ids) for i in cached.index]
        assert lengths == sorted(lengths) and len(lengths) <= 3
        assert [int(n) for n in cached.prompt_mask.sum(1)] == [flat[i].prompt_length for i in cached.index]
        seen += cached.index
    assert sorted(seen) == list(range(len(flat)))


def test_expert_rewards_rewards_and_score_items_equal_each_input_alone(dmoerm, items):
    bank, (flat, _) = dmoerm.bank, flatten(items)
    alone = _reward_alone(bank, RewardModel.EXPERT, flat)
    # RewardModel.rewards: length-bucketed trunk batches (as rewards_of batched).
    rewards = RewardModel(bank).rewards(flat, batch_size=4)
    assert torch.allclose(rewards, alone, atol=TOL, rtol=0)
    old = torch.empty(len(flat))  # the old rewards_of, restated
    for b in trunk_batches(bank, flat, None, batch_size=4):
        with torch.no_grad():
            old[b.index] = bank(b.states, b.attention_mask, RewardModel.EXPERT).float()
    assert torch.equal(rewards, old)
    assert torch.equal(expert_rewards(bank, RewardModel.EXPERT, flat, TrunkCache(), batch_size=4), old)
    # score_items: batch_size items a batch, read from the cache.
    cache = TrunkCache()
    got = score_items(bank, RewardModel.EXPERT, items, cache, batch_size=3)
    assert [len(r) for r in got] == [len(item.inputs) for item in items]
    assert torch.allclose(torch.tensor([r for rs in got for r in rs]), alone, atol=TOL, rtol=0)
    old_items = []
    for start in range(0, len(items), 3):
        chunk = [e for item in items[start : start + 3] for e in item.inputs]
        with torch.no_grad():
            old_items += bank(*pad_states(cache.get(bank, chunk)), RewardModel.EXPERT).tolist()
    assert [r for rs in got for r in rs] == old_items


def _dmoerm_alone(model: DMoERM, inputs):
    """Each input alone through the forward pass, routed on the first response to its prompt (the memo)."""
    rewards, categories, caps, first = [], [], [], {}
    with torch.no_grad():
        for e in inputs:
            states, mask, prompt_mask = _alone(model.bank, e)
            key = e.input_ids[: e.prompt_length]
            feats = first.setdefault(key, model.router.features(states, prompt_mask))
            out = model(states, mask, prompt_mask, model.router.probabilities(feats))
            rewards.append(float(out.reward[0]))
            categories.append(model.categories[int(out.category_index[0])])
            caps.append(out.capability_scores[0])
    return torch.tensor(rewards), categories, caps


def test_dmoerm_entries_equal_each_input_alone_and_route_once_per_prompt(dmoerm, items):
    flat, _ = flatten(items)
    rewards, categories, caps = _dmoerm_alone(dmoerm, flat)
    assert set(categories) == {"code", "chat"}  # both inner models are exercised
    served = dmoerm.score_inputs(flat, batch_size=4)
    cached = score_cached(dmoerm, flat, TrunkCache(), batch_size=4)
    for got_rewards, got_categories, got_caps in (
        (
            torch.tensor([o.reward for o in served]),
            [o.category for o in served],
            [o.capability_scores for o in served],
        ),
        cached,
    ):
        assert torch.allclose(got_rewards, rewards, atol=TOL, rtol=0)
        assert list(got_categories) == categories
        for a, b in zip(got_caps, caps, strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOL for k in a)
    shared = [
        i
        for i, e in enumerate(flat)
        if e.input_ids[: e.prompt_length] == flat[-1].input_ids[: e.prompt_length]
    ]
    assert len(shared) == 4 and len({categories[i] for i in shared}) == 1


def test_score_cached_is_bit_for_bit_the_old_loop(dmoerm, items):
    """The old score_cached: consecutive chunks from the cache, prompt mask from prompt lengths, one memo."""
    flat, _ = flatten(items)
    cache = TrunkCache()
    rewards, routed, caps = torch.empty(len(flat)), [], []
    memo: dict = {}
    with torch.no_grad():
        for start in range(0, len(flat), 4):
            chunk = flat[start : start + 4]
            states, mask = pad_states(cache.get(dmoerm.bank, chunk))
            prompt_mask = torch.zeros_like(mask)
            for i, e in enumerate(chunk):
                prompt_mask[i, : e.prompt_length] = 1
            prompts = [e.input_ids[: e.prompt_length] for e in chunk]
            out = dmoerm(states, mask, prompt_mask, dmoerm.route(states, prompt_mask, prompts, memo))
            rewards[start : start + len(chunk)] = out.reward
            routed += [dmoerm.categories[int(c)] for c in out.category_index]
            caps += out.capability_scores
    got = score_cached(dmoerm, flat, cache, batch_size=4)
    assert torch.equal(got[0], rewards) and got[1] == routed and got[2] == caps
    single = score_cached(RewardModel(dmoerm.bank), flat, cache, batch_size=4)
    old = torch.cat(
        [
            dmoerm.bank(*pad_states(cache.get(dmoerm.bank, flat[s : s + 4])), RewardModel.EXPERT)
            for s in range(0, len(flat), 4)
        ]
    )
    assert torch.equal(single[0], old) and single[1] == [None] * len(flat)
    # score_inputs (length-bucketed, states from the trunk) is the same scorer: its outputs, bit for bit.
    bucketed = dmoerm_outputs(dmoerm, flat, cache, batch_size=4)
    served = dmoerm.score_inputs(flat, batch_size=4)
    assert [o.reward for o in served] == bucketed.reward.tolist()
    assert [o.category for o in served] == bucketed.category


def test_expert_states_equal_each_input_alone_and_the_old_loop(dmoerm, items):
    flat, _ = flatten(items)
    names = dmoerm.aggregator_experts["code"]
    cache = TrunkCache()
    got = expert_states(dmoerm.bank, names, flat, cache, batches=in_order(len(flat), 16))  # [K, N, H]
    assert got.shape == (len(names), len(flat), dmoerm.bank.hidden_size)
    with torch.no_grad():
        alone = torch.cat(
            [dmoerm.bank.all_experts_hidden(*_alone(dmoerm.bank, e)[:2], names) for e in flat], 1
        )
        old = torch.cat(
            [
                dmoerm.bank.all_experts_hidden(*pad_states(cache.get(dmoerm.bank, flat[s : s + 16])), names)
                for s in range(0, len(flat), 16)
            ],
            1,
        )
    assert torch.allclose(got, alone, atol=TOL, rtol=0)
    assert torch.equal(got, old)
    assert torch.allclose(expert_states(dmoerm.bank, names, flat, batch_size=3), alone, atol=TOL, rtol=0)
    assert expert_states(dmoerm.bank, names, [], cache).shape == (len(names), 0, dmoerm.bank.hidden_size)


def test_prompt_features_are_the_routers_features_of_each_prompt(dmoerm, items):
    flat, _ = flatten(items)
    got = prompt_features(dmoerm, flat, TrunkCache(), batch_size=4)  # [N, H]
    with torch.no_grad():
        alone = torch.cat(
            [dmoerm.router.features(*[_alone(dmoerm.bank, e)[i] for i in (0, 2)]) for e in flat]
        )
        # The old phases.prompt_features: the mean of the prompt's states (rounding apart, the same numbers).
        old = torch.stack(
            [s[: e.prompt_length].float().mean(0) for e, s in zip(flat, TrunkCache().get(dmoerm.bank, flat))]
        )
    assert torch.equal(got, alone)  # masked_mean adds exact zeros at pads: batching changes nothing
    assert torch.allclose(got, old, atol=1e-6, rtol=0)
    # The router at training time reads what DMoERM.route reads when scoring.
    probs = dmoerm.router.probabilities(got)
    served = dmoerm.score_inputs(flat, batch_size=4)
    first = {}
    for i, e in enumerate(flat):
        j = first.setdefault(e.input_ids[: e.prompt_length], i)
        c = dmoerm.categories.index(served[i].category)
        assert served[i].category_probability == pytest.approx(float(probs[j, c]), abs=TOL)


def test_expert_agreement_counts_what_each_pair_alone_ranks(dmoerm):
    expert = capability_expert_name("code", "correctness")
    labels = [
        CapabilityLabel(tuple(r.conversation), r.responses[0], r.responses[1], "correctness", "ab"[k % 2])
        for k, r in enumerate(length_records(9, seed=4))
    ]
    pairs = [(lab.response_a, lab.response_b) for lab in labels]
    inputs = [
        dmoerm.encode(list(lab.conversation), resp) for lab, pair in zip(labels, pairs) for resp in pair
    ]
    alone = _reward_alone(dmoerm.bank, expert, inputs)  # [2L]: a then b per label
    assert (alone[0::2] - alone[1::2]).abs().min() > 10 * TOL  # no pair within rounding of a tie
    want = sum(bool(alone[2 * i] > alone[2 * i + 1]) == (lab.winner == "a") for i, lab in enumerate(labels))
    got = expert_agreement(dmoerm, expert, labels, TrunkCache(), batch_size=4)
    assert got == {"n": len(labels), "agreement": want / len(labels)}
    old = torch.cat(  # the old loop: consecutive chunks of batch_size inputs from the cache
        [
            dmoerm.bank(*pad_states(TrunkCache().get(dmoerm.bank, inputs[s : s + 4])), expert)
            for s in range(0, 18, 4)
        ]
    )
    assert torch.equal(
        expert_rewards(dmoerm.bank, expert, inputs, TrunkCache(), batches=in_order(18, 4)), old
    )
