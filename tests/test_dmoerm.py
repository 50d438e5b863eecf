"""DMoERM on a tiny random backbone: each phase trains exactly what it should, routing, persistence, resume."""

from __future__ import annotations

import pytest
import torch

from dmoerm.data import Message
from dmoerm.encoding import EncodedInput, encode, encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.labelling.schema import CapabilityLabel
from dmoerm.model import DMoERM, RoutingConfig, load_model, new_dmoerm
from dmoerm.training import loop
from dmoerm.training.loop import TrainConfig
from dmoerm.training.phases import (
    AggregatorTrainConfig,
    RouterTrainConfig,
    labels_to_items,
    train_phase1,
    train_phase2,
    train_phase3,
    train_router,
)
from dmoerm.training.trunk_cache import TrunkCache
from helpers import length_records, tiny_taxonomy

TAXONOMY = tiny_taxonomy()
FAST = TrainConfig(epochs=2, learning_rate=5e-3, batch_size=4, early_stopping_patience=0)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def diff(before: dict, after: dict) -> set[str]:
    """Parameters of ``after`` that are new or differ from ``before``."""
    return {n for n, p in after.items() if n not in before or not torch.equal(before[n], p)}


def make_model(tiny_backbone) -> DMoERM:
    torch.manual_seed(0)
    config = BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32", max_length=64)
    # Non-zero LoRA init (init_lora_weights=False): otherwise every expert equals the base model at the start.
    return new_dmoerm(config, TAXONOMY, ["code", "chat"], init_lora_weights=False)


def route_examples(model, n=24):
    tok = model.tokenizer
    out = []
    for i in range(n):
        if i % 2:
            text, cat = f"def add(a, b): return a + b  # fix bug {i}", "code"
        else:
            text, cat = f"I am sorry, today was sad, please talk {i}", "chat"
        e = encode(tok, [Message("user", text)], "ok", 64)
        out.append((EncodedInput(e.input_ids[: e.prompt_length], e.prompt_length), cat))
    return out


def label(rec, capability, longer_wins: bool) -> CapabilityLabel:
    a, b = rec.responses
    winner = "a" if (len(a) > len(b)) == longer_wins else "b"
    return CapabilityLabel(rec.conversation, a, b, capability, winner, 0.9, "code", "rule")


@pytest.fixture(scope="module")
def trained(tiny_backbone):
    """A DMoERM trained through all phases on tiny data, with parameter snapshots between phases."""
    model = make_model(tiny_backbone)
    cache = TrunkCache()
    tok, n = model.tokenizer, model.max_length
    snaps = {"start": snapshot(model)}
    router_result = train_router(
        model, route_examples(model), route_examples(model, 8), RouterTrainConfig(epochs=40), cache
    )
    snaps["router"] = snapshot(model)
    recs = length_records(40, seed=0, category="code")
    items = [encode_record(tok, r, n) for r in recs]
    train_phase1(model, "code", items[:16], items[16:20], FAST, cache, progress=False)
    chat = [encode_record(tok, r, n) for r in length_records(8, seed=5, category="chat")]
    train_phase1(model, "chat", chat, [], FAST, cache, progress=False)
    snaps["phase1"] = snapshot(model)
    for cap, longer in (("correctness", True), ("brevity", False)):
        labels = [label(r, cap, longer) for r in recs[:20]]
        train_phase2(model, "code", cap, labels_to_items(labels, tok, n), [], FAST, cache, progress=False)
    snaps["phase2"] = snapshot(model)
    train_phase3(model, "code", items[20:36], items[36:40], AggregatorTrainConfig(epochs=5), cache)
    snaps["phase3"] = snapshot(model)
    return model, snaps, recs, router_result


def test_router_trains_only_router_and_routes(trained):
    model, snaps, _, result = trained
    router = {n for n in snaps["start"] if n.startswith("router.")}
    assert diff(snaps["start"], snaps["router"]) == router
    assert result.dev_accuracy >= 0.75


def test_each_phase_changes_only_its_parameters(trained):
    model, snaps, _, _ = trained
    # phase 1: the code__rm adapter and head (and later phases must not touch them)
    phase1 = diff(snaps["router"], snaps["phase1"])
    assert phase1 and all("__rm." in n for n in phase1)
    lora_rm = [n for n in phase1 if ".code__rm." in n]
    assert lora_rm, "phase 1 must train its LoRA adapter"
    phase2 = diff(snaps["phase1"], snaps["phase2"])
    assert any(".code__correctness." in n for n in phase2) and any("heads.code__brevity" in n for n in phase2)
    assert all("code__correctness" in n or "code__brevity" in n for n in phase2)
    for n in phase1:  # phase 1 and router weights untouched by phases 2 and 3
        assert torch.equal(snaps["phase1"][n], snaps["phase3"][n])
    for n in snaps["router"]:
        if n.startswith("router."):
            assert torch.equal(snaps["router"][n], snaps["phase3"][n])
    phase3 = diff(snaps["phase2"], snaps["phase3"])
    assert phase3 and all(n.startswith("aggregators.code.") for n in phase3)


def test_experts_with_different_labels_score_differently(trained):
    model, _, recs, _ = trained
    rows = recs[20:40]
    inputs = [model.encode(r.conversation, resp) for r in rows for resp in r.responses]
    cache = TrunkCache()
    from dmoerm.scoring import expert_states

    names = model.category_experts("code")
    hidden = expert_states(model.bank, names, inputs, cache)  # [K, N, H]
    scores = [model.bank.heads[nm](hidden[i]).squeeze(-1) for i, nm in enumerate(names)]
    longer_first = sum(float(s[2 * j] > s[2 * j + 1]) for j in range(len(rows)) for s in [scores[0]]) / len(
        rows
    )
    shorter_first = sum(float(s[2 * j] < s[2 * j + 1]) for j in range(len(rows)) for s in [scores[1]]) / len(
        rows
    )
    assert longer_first >= 0.8 and shorter_first >= 0.8


def test_score_routes_and_returns_capabilities(trained):
    model, _, recs, _ = trained
    code_conv = [Message("user", "def add(a, b): return a + b  # fix bug 99")]
    chat_conv = [Message("user", "I am sorry, today was sad, please talk 98")]
    out = model.score([code_conv, chat_conv], ["a b c", "hello"])
    assert [o.category for o in out] == ["code", "chat"]
    assert set(out[0].capability_scores) == {"correctness", "brevity"}
    assert 0.5 < out[0].category_probability <= 1.0
    # The code row is scored by the code inner model (its aggregator), the chat row by chat's phase-1 fallback.
    enc = model.encode(code_conv, "a b c")
    from dmoerm.encoding import collate

    b = collate([enc], model.tokenizer.pad_token_id)
    states = model.bank.trunk(b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        r, _, _ = model.inner_reward(states, b["attention_mask"], "code")
    assert abs(float(r[0]) - out[0].reward) < 1e-5


def test_batched_scoring_equals_separate(trained):
    model, _, recs, _ = trained
    convs = [list(r.conversation) for r in recs[:6]]
    resps = [r.responses[i % 2] for i, r in enumerate(recs[:6])]
    together = [o.reward for o in model.score(convs, resps, batch_size=6)]
    alone = [model.score([c], [r])[0].reward for c, r in zip(convs, resps)]
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-4)


def test_all_experts_pass_equals_separate_passes(trained):
    model, _, recs, _ = trained
    from dmoerm.encoding import collate

    batch = collate(
        [model.encode(r.conversation, r.responses[0]) for r in recs[:5]], model.tokenizer.pad_token_id
    )
    states = model.bank.trunk(batch["input_ids"], batch["attention_mask"])
    names = model.category_experts("code") + ["code__rm"]
    with torch.no_grad():
        together = model.bank.all_experts_hidden(states, batch["attention_mask"], names)
        separate = torch.stack([model.bank.expert_hidden(states, batch["attention_mask"], n) for n in names])
    assert torch.allclose(together, separate, atol=1e-4)
    assert not torch.allclose(separate[0], separate[1])


def test_topk_routing_mixes_inner_models(trained):
    model, _, _, _ = trained
    conv = [Message("user", "hmm")]
    top1 = model.score([conv], ["x y"])[0]
    model.routing = RoutingConfig(mode="topk", top_k=2, mix_below=1.0)
    try:
        mixed = model.score([conv], ["x y"])[0]
    finally:
        model.routing = RoutingConfig()
    assert mixed.category == top1.category
    assert mixed.reward != pytest.approx(top1.reward)


def test_ablation_aggregations_score_with_the_mean_or_the_phase1_model(trained):
    model, _, _, _ = trained
    conv = [Message("user", "def add(a, b): return a + b #1")]
    full = model.score([conv], ["short"])[0]
    e = model.encode(conv, "short")
    states = model.bank.trunk(torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids), dtype=torch.long))
    mask = torch.ones(1, len(e.input_ids), dtype=torch.long)
    try:
        model.routing = RoutingConfig(aggregation="mean")
        mean = model.score([conv], ["short"])[0]
        model.routing = RoutingConfig(aggregation="phase1")
        phase1 = model.score([conv], ["short"])[0]
    finally:
        model.routing = RoutingConfig()
    assert mean.reward == pytest.approx(
        sum(full.capability_scores.values()) / len(full.capability_scores), abs=1e-5
    )
    with torch.no_grad():
        expected = model.bank(states, mask, f"{full.category}__rm")
    assert phase1.reward == pytest.approx(float(expected), abs=1e-5)
    assert list(phase1.capability_scores) == ["rm"]


def test_save_then_load_gives_identical_scores(trained, tmp_path):
    model, _, recs, _ = trained
    convs = [list(r.conversation) for r in recs[:4]]
    resps = [r.responses[0] for r in recs[:4]]
    before = model.score(convs, resps)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    after = loaded.score(convs, resps)
    for a, b in zip(before, after):
        assert a.reward == pytest.approx(b.reward, abs=1e-6)
        assert a.category == b.category
        assert a.capability_scores == pytest.approx(b.capability_scores, abs=1e-6)


def test_phase2_requires_phase1(tiny_backbone):
    model = make_model(tiny_backbone)
    with pytest.raises(ValueError, match="phase 1 first"):
        train_phase2(model, "chat", "empathy", [], [], FAST, TrunkCache(), progress=False)


def test_routing_config_validation():
    with pytest.raises(ValueError, match="mode"):
        RoutingConfig(mode="top3")
    with pytest.raises(ValueError, match="aggregation"):
        RoutingConfig(aggregation="max")


def test_resume_after_interrupted_phase_equals_uninterrupted(tiny_backbone, tmp_path, monkeypatch):
    recs = length_records(24, seed=3, category="code")
    config = TrainConfig(epochs=3, learning_rate=5e-3, batch_size=4, early_stopping_patience=0)

    def run(ckpt):
        model = make_model(tiny_backbone)
        items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
        train_phase1(
            model, "code", items[:16], items[16:], config, TrunkCache(), checkpoint_dir=ckpt, progress=False
        )
        return {n: p for n, p in snapshot(model).items() if "code__rm" in n}

    reference = run(None)
    calls = {"n": 0}
    original = loop.batch_items

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 batches per epoch: dies in the middle of epoch 2
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_items", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt")
    monkeypatch.setattr(loop, "batch_items", original)
    resumed = run(tmp_path / "ckpt")
    for n in reference:
        assert torch.allclose(reference[n], resumed[n], atol=1e-6), n
