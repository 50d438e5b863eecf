"""Run files: checkpoints are safetensors + JSON (never a pickle), damaged files name themselves and the way
out, adapters load strictly, one Accelerator serves every phase, the router starts from seeded weights."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open

from dmoerm.encoding import encode_record
from dmoerm.experts import ExpertBank
from dmoerm.labelling.cache import JudgeCache
from dmoerm.model import DMoERM
from dmoerm.training import loop
from dmoerm.training.checkpoint import CHECKPOINT_FILE
from dmoerm.training.loop import TrainConfig
from dmoerm.training.phases import RouterTrainConfig, train_phase1, train_router
from dmoerm.training.trunk_cache import TrunkCache
from helpers import length_records
from test_dmoerm import make_model, route_examples, snapshot

CONFIG = TrainConfig(epochs=2, learning_rate=5e-3, batch_size=4, early_stopping_patience=0)


def _phase1(model, ckpt, config=CONFIG):
    recs = length_records(16, seed=3, category="code")
    items = [encode_record(model.tokenizer, r, model.max_length) for r in recs]
    return train_phase1(
        model, "code", items[:12], items[12:], config, TrunkCache(), checkpoint_dir=ckpt, progress=False
    )


class _Planted:
    """A pickle that creates a file when loaded: what a hostile run folder could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_is_safetensors_with_json_and_a_planted_pickle_is_never_loaded(tiny_backbone, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    (ckpt / "checkpoint.pt").write_bytes(pickle.dumps(_Planted(marker)))
    result = _phase1(make_model(tiny_backbone), ckpt)
    assert not marker.exists()
    with safe_open(str(ckpt / CHECKPOINT_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["dmoerm_checkpoint"])
        keys = set(f.keys())
    assert meta["epoch"] == 2 and meta["result"]["steps"] == result.steps
    assert {"param.0", "best.0", "rng.torch", "optim.0.exp_avg", "optim.0.step"} <= keys
    # Resuming from the finished checkpoint restores the same weights (the best state) without training.
    model = make_model(tiny_backbone)
    again = _phase1(model, ckpt)
    assert again.steps == result.steps and again.history == result.history


@pytest.mark.slow
def test_a_resumed_checkpoint_trains_on_like_an_uninterrupted_run(tiny_backbone, tmp_path, monkeypatch):
    config = TrainConfig(epochs=3, learning_rate=5e-3, batch_size=4, early_stopping_patience=0)
    reference = _phase1(model := make_model(tiny_backbone), None, config)
    ref = {n: p for n, p in snapshot(model).items() if "code__rm" in n}
    calls = {"n": 0}
    original = loop.batch_items

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 batches per epoch
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_items", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _phase1(make_model(tiny_backbone), tmp_path / "ckpt", config)
    monkeypatch.setattr(loop, "batch_items", original)
    resumed_result = _phase1(model := make_model(tiny_backbone), tmp_path / "ckpt", config)
    assert resumed_result.history["loss"] == pytest.approx(reference.history["loss"], abs=1e-6)
    for n, p in snapshot(model).items():
        if n in ref:
            assert torch.allclose(ref[n], p, atol=1e-6), n


@pytest.mark.slow
def test_a_damaged_checkpoint_names_the_file_and_what_to_do(tiny_backbone, tmp_path):
    ckpt = tmp_path / "ckpt"
    _phase1(make_model(tiny_backbone), ckpt)
    path = ckpt / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"ckpt/checkpoint\.safetensors: cannot resume .*delete it to train"):
        _phase1(make_model(tiny_backbone), ckpt)


@pytest.mark.slow
def test_mixed_precision_may_differ_per_phase_in_one_process(tiny_backbone, tmp_path):
    import dataclasses

    from dmoerm.training.distributed import process_accelerator

    model = make_model(tiny_backbone)
    _phase1(model, None, dataclasses.replace(CONFIG, mixed_precision="bf16", epochs=1))
    _phase1(model, None, dataclasses.replace(CONFIG, mixed_precision="no", epochs=1))
    assert process_accelerator() is process_accelerator()


def test_the_router_starts_from_weights_drawn_under_its_seed(tiny_backbone):
    def train(global_seed: int):
        model = make_model(tiny_backbone)
        torch.manual_seed(global_seed)  # whatever the process's RNG did before does not matter
        model.router.head.reset_parameters()
        examples = route_examples(model)
        result = train_router(model, examples[:16], examples[16:], RouterTrainConfig(epochs=3), TrunkCache())
        return result, {k: v.clone() for k, v in model.router.state_dict().items()}

    (r1, w1), (r2, w2) = train(1), train(2)
    assert r1.history["loss"] == r2.history["loss"]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_adapter_keys_must_match_exactly(tiny_backbone, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(tiny_backbone)
    model.bank.add_expert("code__rm")
    model.bank.save(tmp_path / "bank")
    ExpertBank.load(tmp_path / "bank")  # the saved bank loads
    weights = tmp_path / "bank" / "adapters" / "code__rm" / "adapter_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != first}, weights)
    with pytest.raises(
        ValueError, match=r"adapters/code__rm: adapter code__rm does not match the model: missing"
    ):
        ExpertBank.load(tmp_path / "bank")
    save_file({**state, "base_model.model.bogus.lora_A.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError, match=r"unexpected \['base_model\.model\.bogus"):
        ExpertBank.load(tmp_path / "bank")
    shutil.rmtree(weights.parent)
    with pytest.raises(ValueError, match=r"adapter code__rm is listed in experts\.json but .* is missing"):
        ExpertBank.load(tmp_path / "bank")


def test_a_damaged_router_file_in_a_run_names_it(tiny_backbone, tmp_path):
    from dmoerm.config_check import RunStopped
    from dmoerm.pipeline.state import load_run_model

    model = make_model(tiny_backbone)
    model.save_pretrained(tmp_path / "model")
    DMoERM.from_pretrained(tmp_path / "model")
    router = tmp_path / "model" / "router.safetensors"
    router.write_bytes(router.read_bytes()[:40])
    with pytest.raises(RunStopped, match=r"damaged: .*model/router\.safetensors.*Delete .*model to train"):
        load_run_model(tmp_path / "model")


def test_a_damaged_judge_cache_names_the_file(tmp_path):
    path = tmp_path / "judge.cache.sqlite"
    with JudgeCache(path) as cache:
        cache.put("k", "judge", {"raw": "1"})
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=r"judge\.cache\.sqlite: not a readable judge cache .*delete it"):
        JudgeCache(path)
