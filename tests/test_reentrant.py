"""The split backbone and the expert bank are re-entrant: a forward changes no module, so two threads scoring
at once, or a forward called from inside another, give exactly what the same calls give one after another."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dmoerm.experts import BackboneConfig, ExpertBank

NAMES = ["phase1", "alpha", "beta"]


@pytest.fixture(scope="module")
def bank(tiny_backbone, one_torch_thread):
    torch.manual_seed(3)
    bank = ExpertBank(
        BackboneConfig(backbone=tiny_backbone, num_top_layers=2, lora_rank=4), init_lora_weights=False
    )
    for name in NAMES:  # random adapters (init_lora_weights=False): each expert computes something else
        bank.add_expert(name)
    return bank.eval()


def _batch(seed: int, b: int = 3, t: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (b, t), generator=g)  # [B, T]
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 4 :] = 0  # right padding
    mask[b - 1, :3] = 0  # left padding (the last row)
    return ids, mask


def _score(bank: ExpertBank, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> dict:
    with torch.no_grad():
        states = bank.trunk(ids, mask)  # [B, T, H]
        return {
            "trunk": states,
            "trunk_batched": bank.backbone.trunk_batched(ids, mask),
            "top": bank.backbone.top(states, mask),
            "experts": bank.all_experts_hidden(states, mask, names),  # [K, B, H], mixed-adapter batch
            "rewards": torch.stack([bank(states, mask, n) for n in names]),  # [K, B], one expert at a time
        }


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _watch_layers(bank: ExpertBank, on_layer) -> list:
    """Pre-hooks on every decoder layer calling ``on_layer(index)``; returns the handles."""
    layers = list(bank.backbone.decoder.layers)
    return [
        layer.register_forward_pre_hook(lambda module, args, i=i: on_layer(i) and None)
        for i, layer in enumerate(layers)
    ]


def test_forward_never_changes_the_decoders_layers_norm_or_config(bank):
    decoder = bank.backbone.decoder
    layers, norm, n = decoder.layers, decoder.norm, decoder.config.num_hidden_layers
    members, active = list(layers), bank.peft_model.active_adapter
    seen = []

    def check(i):
        seen.append(i)
        assert decoder.layers is layers and list(decoder.layers) == members
        assert decoder.norm is norm and decoder.config.num_hidden_layers == n == 4
        assert bank.peft_model.active_adapter == active  # scoring names experts per row, never switches

    handles = _watch_layers(bank, check)
    try:
        _score(bank, *_batch(0), NAMES)
        with torch.no_grad():
            bank.backbone.top_last_token(bank.trunk(*_batch(0)), _batch(0)[1])
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == {0, 1, 2, 3}  # trunk layers and top layers both ran under the check


def test_a_forward_inside_another_gives_the_sequential_results(bank):
    outer_in, inner_in = _batch(1), _batch(2, b=2, t=7)
    expected_outer = _score(bank, *outer_in, NAMES)
    expected_inner = _score(bank, *inner_in, NAMES[::-1])
    inner = []

    def nested(i):
        if i == 3 and not inner:  # inside the outer call's top layers (and its mixed batch)
            inner.append(None)
            inner[0] = _score(bank, *inner_in, NAMES[::-1])

    handles = _watch_layers(bank, nested)
    try:
        outer = _score(bank, *outer_in, NAMES)
    finally:
        for handle in handles:
            handle.remove()
    _assert_equal(outer, expected_outer)
    _assert_equal(inner[0], expected_inner)


def test_two_threads_scoring_at_once_give_the_sequential_results(bank):
    jobs = [(_batch(4), NAMES), (_batch(5, b=2, t=9), ["beta", "phase1"])]
    expected = [_score(bank, *inputs, names) for inputs, names in jobs]
    # A short pause inside every layer hands the interpreter to the other thread mid-forward.
    handles = _watch_layers(bank, lambda i: time.sleep(0.0005))
    barrier = threading.Barrier(len(jobs))
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(j):
        try:
            barrier.wait()
            for _ in range(4):
                results[j].append(_score(bank, *jobs[j][0], jobs[j][1]))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(jobs))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for handle in handles:
            handle.remove()
    assert not errors, errors
    for j, runs in enumerate(results):
        assert len(runs) == 4
        for run in runs:
            _assert_equal(run, expected[j])


def test_mixed_batch_checks_names_and_mode(bank):
    states = bank.trunk(*_batch(0))
    with pytest.raises(ValueError, match=r"no expert named gamma \(experts: phase1, alpha, beta\)"):
        bank.all_experts_hidden(states, _batch(0)[1], ["alpha", "gamma"])
    bank.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            bank.all_experts_hidden(states, _batch(0)[1], NAMES)
    finally:
        bank.eval()


def test_copies_between_experts_and_banks_go_through_the_adapter_state_dict(bank, tiny_backbone):
    from peft import get_peft_model_state_dict

    copy = ExpertBank(bank.config)
    copy.import_expert(bank, "alpha", "imported")
    copy.add_expert("child", init_from="imported")
    want = get_peft_model_state_dict(bank.peft_model, adapter_name="alpha")
    for name in ("imported", "child"):
        got = get_peft_model_state_dict(copy.peft_model, adapter_name=name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(copy.heads[name].weight, bank.heads["alpha"].weight)
    with pytest.raises(ValueError, match="the other bank has no expert named 'gamma'"):
        copy.import_expert(bank, "gamma", "g")
    partial = {k: v for k, v in want.items() if "lora_B" not in k}
    with pytest.raises(ValueError, match="test: adapter child does not match the model: missing"):
        copy._set_adapter_state("child", partial, "test")


def test_layer_views_follow_the_model_after_a_move_and_a_mode_change(tiny_backbone):
    from transformers import AutoModel

    from dmoerm.backbone import SplitBackbone

    ids, mask = _batch(6)
    moved = SplitBackbone(AutoModel.from_pretrained(tiny_backbone), 2, torch.float32).eval()
    with torch.no_grad():
        moved.top(moved.trunk(ids, mask), mask)  # views built and cached for float32 weights
    # .to() replaces every parameter and buffer: the cached views must compute with the new ones.
    moved.to(torch.float64)
    moved.trunk_dtype = torch.float64
    fresh = SplitBackbone(AutoModel.from_pretrained(tiny_backbone).to(torch.float64), 2, torch.float64).eval()
    outputs = []
    with torch.no_grad():
        for backbone in (moved, fresh):
            states = backbone.trunk(ids, mask)  # [B, T, H] float64
            outputs.append((states, backbone.top(states, mask), backbone.top_last_token(states, mask)))
    assert outputs[0][0].dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    moved.train()  # a rebound attribute of the decoder (training) gives a fresh view that mirrors it
    assert moved._layers(0, moved.split, final_norm=False).training
    assert moved.decoder.config.num_hidden_layers == len(moved.decoder.layers) == 4
