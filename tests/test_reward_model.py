"""The single reward model: loss, training touches exactly the trainable parameters, persistence."""

from __future__ import annotations

import pytest
import torch

from dmoerm.data import Message
from dmoerm.experts import BackboneConfig
from dmoerm.model import load_model
from dmoerm.outputs import InputTooLongError
from dmoerm.reward_model import RewardModel
from dmoerm.training.loop import TrainConfig, ranking_loss
from dmoerm.training.single import train_reward_model
from helpers import length_records


def test_ranking_loss_on_hand_made_tensors():
    rewards = torch.tensor([2.0, 0.0, 1.0])
    pairs = torch.tensor([[0, 1], [0, 2], [2, 1]])
    expected = -torch.nn.functional.logsigmoid(torch.tensor([2.0, 1.0, 1.0])).mean()
    assert torch.allclose(ranking_loss(rewards, pairs), expected)
    weighted = ranking_loss(rewards, pairs, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(weighted, -torch.nn.functional.logsigmoid(torch.tensor(2.0)))


def test_ranked_list_gives_every_untied_pair():
    from dmoerm.data import PreferenceRecord

    rec = PreferenceRecord((Message("user", "q"),), ("a", "b", "c", "d"), (0, 1, 1, 2))
    assert sorted(rec.pairs()) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def _config(backbone, max_length=64, **kw):
    return BackboneConfig(
        backbone=backbone, num_top_layers=2, trunk_dtype="float32", max_length=max_length, **kw
    )


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_training_changes_every_trainable_parameter_and_no_frozen_one(tiny_backbone, tmp_path, finetune):
    torch.manual_seed(0)
    model = RewardModel.create(_config(tiny_backbone, finetune=finetune), init_lora_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.bank.expert_parameters(RewardModel.EXPERT)}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    train_reward_model(
        length_records(16),
        [],
        _config(tiny_backbone),
        TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2),
        tmp_path / "rm",
        model=model,
        progress=False,
    )
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved == names
    if finetune == "lora":
        assert all("lora_" in n or n.startswith("bank.heads.") for n in names)
    else:
        assert any(".layers.3." in n for n in names) and not any(".layers.0." in n for n in names)


def test_learns_a_simple_rule_and_save_load_gives_identical_rewards(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    model, result = train_reward_model(
        length_records(48),
        length_records(16, seed=1),
        _config(tiny_backbone),
        TrainConfig(epochs=3, batch_size=8, learning_rate=5e-3),
        tmp_path / "rm",
        progress=False,
    )
    assert result.best_dev_agreement >= 0.8
    for name in (
        "curves.png",
        "train_config.json",
        "backbone_config.json",
        "heads.safetensors",
        "dmoerm_model.json",
    ):
        assert (tmp_path / "rm" / name).exists(), name
    recs = length_records(5, seed=7)
    convs, resps = [list(r.conversation) for r in recs], [r.responses[1] for r in recs]
    before = [o.reward for o in model.score(convs, resps)]
    loaded = load_model(tmp_path / "rm")
    assert isinstance(loaded, RewardModel)
    assert [o.reward for o in loaded.score(convs, resps)] == pytest.approx(before, abs=1e-6)
    # A finished run is loaded, not retrained.
    again, again_result = train_reward_model([], [], _config(tiny_backbone), TrainConfig(), tmp_path / "rm")
    assert again_result is None


def test_batched_rewards_equal_separate_and_text_scoring(tiny_backbone):
    torch.manual_seed(0)
    model = RewardModel.create(_config(tiny_backbone, max_length=256), init_lora_weights=False)
    recs = length_records(6, seed=2)
    convs, resps = [list(r.conversation) for r in recs], [r.responses[i % 2] for i, r in enumerate(recs)]
    together = [o.reward for o in model.score(convs, resps, batch_size=6)]
    alone = [model.score([c], [r])[0].reward for c, r in zip(convs, resps)]
    assert together == pytest.approx(alone, abs=1e-5)
    prompt = model.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": recs[0].conversation[0].content},
            {"role": "assistant", "content": resps[0]},
        ],
        tokenize=False,
    )
    assert model.score_texts([prompt])[0] == pytest.approx(together[0], abs=1e-5)
    with pytest.raises(InputTooLongError, match="query\\[0\\]"):
        model.score_texts(["word " * 800])


def test_train_config_validation():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
