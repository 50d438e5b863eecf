import pytest
import torch

from dmoerm.backbone import last_token_pool, masked_mean, position_ids_from_mask, resolve_backbone
from dmoerm.encoding import collate, encode
from dmoerm.experts import BackboneConfig, ExpertBank


def test_last_token_pool_right_and_left_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(last_token_pool(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_masked_mean_and_positions():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]
    assert position_ids_from_mask(torch.tensor([[1, 1, 1, 0, 0]])).tolist() == [[0, 1, 2, 2, 2]]


def test_resolve_local_folder_and_hub_id(tiny_backbone):
    assert resolve_backbone(tiny_backbone) == tiny_backbone
    assert resolve_backbone("someone/some-model") == "someone/some-model"


def test_split_equals_full_model_and_left_padding_equals_right(tiny_backbone):
    from transformers import AutoModel

    bank = ExpertBank(BackboneConfig(backbone=tiny_backbone, num_top_layers=2, trunk_dtype="float32"))
    bank.add_expert("reward")
    tok = bank.tokenizer
    enc = [
        encode(tok, [{"role": "user", "content": "hi there"}], r, 64) for r in ["yes", "no thanks, bye now"]
    ]
    batch = collate(enc, tok.pad_token_id)
    ref = AutoModel.from_pretrained(tiny_backbone)(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        ours = bank.backbone(batch["input_ids"], batch["attention_mask"])  # LoRA B is zero at init
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], ref.last_hidden_state[real], atol=1e-5)
    # The same rows left-padded give the same last-token states.
    left_ids = torch.stack(
        [torch.roll(r, int((m == 0).sum())) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    )
    left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in batch["attention_mask"]])
    with torch.no_grad():
        left = bank.backbone(left_ids, left_mask)
    assert torch.allclose(
        last_token_pool(left, left_mask), last_token_pool(ours, batch["attention_mask"]), atol=1e-5
    )


def test_backbone_config_validation():
    with pytest.raises(ValueError, match="finetune"):
        BackboneConfig(finetune="qlora")
    with pytest.raises(ValueError, match="num_top_layers"):
        BackboneConfig(num_top_layers=0)
    with pytest.raises(ValueError, match="trunk_dtype"):
        BackboneConfig(trunk_dtype="int8")


def test_too_many_top_layers(tiny_backbone):
    with pytest.raises(ValueError, match="num_top_layers"):
        ExpertBank(BackboneConfig(backbone=tiny_backbone, num_top_layers=9))
