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


def test_resolve_local_folder(tiny_backbone):
    assert resolve_backbone(tiny_backbone) == tiny_backbone


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and downloads allowed only if a test opts in."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("DMOERM_ALLOW_DOWNLOAD", raising=False)
    return cache


def test_unknown_hub_id_fails_at_once_offline(empty_hub_cache, monkeypatch):
    import time

    import huggingface_hub

    def no_network(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("resolve_backbone asked the network without opt-in")
        return real(*args, **kwargs)

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        resolve_backbone("no-such/model")
    assert time.perf_counter() - t0 < 2.0
    message = str(err.value)
    assert "'no-such/model'" in message and str(empty_hub_cache) in message  # what, and where
    assert "no folder" in message and "no-such/model" in message
    assert "allow_download" in message and "DMOERM_ALLOW_DOWNLOAD=1" in message  # how to opt in


def test_missing_local_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "models" / "nope"
    with pytest.raises(FileNotFoundError, match=f"no folder {missing}"):
        resolve_backbone(str(missing))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_backbone(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no folder"):
        resolve_backbone("./runs/main/backbone")


def test_cached_hub_snapshot_resolves_offline(empty_hub_cache, tiny_backbone):
    import shutil

    snapshot = empty_hub_cache / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_backbone, snapshot)
    (empty_hub_cache / "models--someone--tiny" / "refs").mkdir()
    (empty_hub_cache / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    assert resolve_backbone("someone/tiny") == str(snapshot)
    bank = ExpertBank(BackboneConfig(backbone="someone/tiny", num_top_layers=1, trunk_dtype="float32"))
    assert bank.tokenizer.chat_template


@pytest.mark.parametrize("opt_in", ["config", "env"])
def test_download_only_when_asked(empty_hub_cache, monkeypatch, opt_in):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    if opt_in == "env":
        monkeypatch.setenv("DMOERM_ALLOW_DOWNLOAD", "1")
        config = BackboneConfig(backbone="someone/remote")
    else:
        config = BackboneConfig(backbone="someone/remote", allow_download=True)
    with pytest.raises(FileNotFoundError, match="could not download hub model 'someone/remote'.*unreachable"):
        ExpertBank(config)
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    with pytest.raises(ValueError, match="allow_download"):
        BackboneConfig(allow_download="yes")


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
