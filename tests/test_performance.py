"""The fast paths give the same numbers as the slow ones (the performance issue's equivalence tests).

- All K experts in one mixed-adapter pass over the shared trunk == K separate top passes == K naive full-model
  passes with ``set_adapter`` (the paper's way), within 1e-4.
- DMoERM scoring (router on the shared trunk + one batched expert pass + aggregator) == the naive K+1-pass
  DMoERM (a router pass, then one full pass per expert).
- Training on cached trunk states == training with the trunk recomputed at every step, and a cache too small
  for the data (LRU eviction) changes nothing either.
"""

from __future__ import annotations

import pytest
import torch

from dmoerm.backbone import last_token_pool, position_ids_from_mask
from dmoerm.encoding import collate, encode_record
from dmoerm.experts import BackboneConfig, ExpertBank
from dmoerm.model import new_dmoerm
from dmoerm.taxonomy import Capability, Category, Taxonomy
from dmoerm.training.loop import TrainConfig, train_expert
from dmoerm.training.trunk_cache import TrunkCache, pad_states
from helpers import add_capability_experts, length_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


NAMES = ["e0", "e1", "e2", "e3"]
TAXONOMY = Taxonomy(
    name="tiny",
    categories=(
        Category("code", "programming", (Capability("correctness", "right"), Capability("brevity", "short"))),
        Category(
            "chat",
            "talk",
            (Capability("empathy", "kind"), Capability("clarity", "clear"), Capability("safety", "safe")),
        ),
    ),
)


def _config(backbone: str, trunk_dtype: str = "float32") -> BackboneConfig:
    return BackboneConfig(backbone=backbone, num_top_layers=2, trunk_dtype=trunk_dtype, max_length=64)


def _bank(backbone: str, trunk_dtype: str = "float32") -> ExpertBank:
    torch.manual_seed(0)
    # Non-zero LoRA B (init_lora_weights=False): with PEFT's default init every expert equals the base model.
    bank = ExpertBank(_config(backbone, trunk_dtype), init_lora_weights=False)
    for name in NAMES:
        bank.add_expert(name)
    bank.eval()
    return bank


def _batch(tokenizer, n: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    recs = length_records(n, seed=seed)
    inputs = [encode_record(tokenizer, r, 64).inputs[i % 2] for i, r in enumerate(recs)]
    return collate(inputs, tokenizer.pad_token_id)  # right-padded, rows of different lengths


def _naive_full_pass(bank: ExpertBank, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The paper's way: the whole model (all layers, no trunk split, no cache) with one adapter set."""
    peft = bank.peft_model
    peft.set_adapter(name)
    mask = batch["attention_mask"]
    out = peft(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    return last_token_pool(out.last_hidden_state, mask)  # [B, H]


def test_batched_experts_equal_separate_and_naive_full_passes(tiny_backbone):
    bank = _bank(tiny_backbone)
    batch = _batch(bank.tokenizer)
    mask = batch["attention_mask"]
    with torch.no_grad():
        states = bank.trunk(batch["input_ids"], mask)
        batched = bank.all_experts_hidden(states, mask, NAMES)  # [K, B, H]
        separate = torch.stack([bank.expert_hidden(states, mask, n) for n in NAMES])
        naive = torch.stack([_naive_full_pass(bank, batch, n) for n in NAMES])
    assert batched.shape == (len(NAMES), mask.shape[0], bank.hidden_size)
    assert torch.allclose(batched, separate, atol=1e-4)
    assert torch.allclose(batched, naive, atol=1e-4)
    # The experts really differ, so the check above could fail.
    assert (separate[0] - separate[1]).abs().max() > 1e-2
    # The expert order of the batch is the order of the names (no mix-up of rows between adapters).
    shuffled = bank.all_experts_hidden(states, mask, NAMES[::-1])
    assert torch.allclose(shuffled, batched.flip(0), atol=1e-4)


def test_batched_experts_equal_separate_with_bf16_trunk(tiny_backbone):
    # The default trunk dtype: the top layers (and the experts' branches) still run in float32.
    bank = _bank(tiny_backbone, "bfloat16")
    batch = _batch(bank.tokenizer, n=6, seed=2)
    mask = batch["attention_mask"]
    with torch.no_grad():
        states = bank.trunk(batch["input_ids"], mask)
        assert states.dtype == torch.bfloat16
        batched = bank.all_experts_hidden(states, mask, NAMES)
        separate = torch.stack([bank.expert_hidden(states, mask, n) for n in NAMES])
    assert torch.allclose(batched, separate, atol=1e-4)


def _dmoerm(tiny_backbone):
    torch.manual_seed(0)
    model = new_dmoerm(_config(tiny_backbone), TAXONOMY, ["code", "chat"], init_lora_weights=False)
    add_capability_experts(model, TAXONOMY, with_rm=False)
    with torch.no_grad():  # a router that sends rows both ways
        model.router.head.weight.normal_(0.0, 3.0)
    model.requires_grad_(False)
    model.eval()
    return model


def _naive_dmoerm_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """K+1 passes per category: the router's own pass, then one full pass per expert of the chosen category."""
    bank = model.bank
    mask = batch["attention_mask"]
    trunk = bank.backbone.trunk(batch["input_ids"], mask)  # the router's pass (it reads the trunk)
    top = model.router.probabilities(model.router.features(trunk, batch["prompt_mask"])).argmax(-1)
    reward = torch.zeros(mask.shape[0])
    for c, category in enumerate(model.categories):
        rows = (top == c).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        sub = {k: v[rows] for k, v in batch.items()}
        names = model.aggregator_experts[category]
        hidden = torch.stack([_naive_full_pass(bank, sub, n) for n in names])  # [K, b, H]
        reward[rows] = model.aggregators[category](hidden)
    return reward


def test_dmoerm_single_pass_scoring_equals_naive_k_plus_1_passes(tiny_backbone):
    model = _dmoerm(tiny_backbone)
    recs = length_records(8, seed=4)
    inputs = [e for r in recs for e in encode_record(model.tokenizer, r, 64).inputs]
    fast = model.score_inputs(inputs, batch_size=16)
    batch = collate(inputs, model.tokenizer.pad_token_id)
    with torch.no_grad():
        naive = _naive_dmoerm_rewards(model, batch)
    assert {o.category for o in fast} == {"code", "chat"}, "both inner models must be exercised"
    assert torch.allclose(torch.tensor([o.reward for o in fast]), naive, atol=1e-4)


class RecomputeTrunk(TrunkCache):
    """No cache: every batch's trunk states are recomputed (in that batch), as a plain training loop would."""

    def get(self, bank, inputs, batch_size=16, desc=None):
        batch = collate(list(inputs), bank.tokenizer.pad_token_id)
        states = bank.trunk(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
        return [states[i, : len(e.input_ids)] for i, e in enumerate(inputs)]


def _train(tiny_backbone, cache: TrunkCache, trunk_dtype: str = "float32"):
    torch.manual_seed(0)
    bank = ExpertBank(_config(tiny_backbone, trunk_dtype), init_lora_weights=False)
    bank.add_expert("reward")
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(8, seed=7)]
    config = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, early_stopping_patience=0)
    result = train_expert(bank, "reward", items, [], config, cache)
    weights = [p.detach().clone() for p in bank.expert_parameters("reward")]
    return result.history["loss"], weights


def test_training_on_cached_trunk_equals_recomputing_it(tiny_backbone):
    cached_loss, cached_w = _train(tiny_backbone, TrunkCache())
    plain_loss, plain_w = _train(tiny_backbone, RecomputeTrunk())
    # A cache far smaller than the data: LRU eviction and recomputation must not change anything either.
    tiny = TrunkCache(max_bytes=3 * 40 * 32 * 4)
    tiny_loss, tiny_w = _train(tiny_backbone, tiny)
    assert len(cached_loss) == 4  # 2 batches x 2 epochs
    assert cached_loss[-1] < cached_loss[0]  # it trained
    # Recomputing the trunk in the same batches gives bit-identical training.
    assert cached_loss == plain_loss
    for a, b in zip(cached_w, plain_w, strict=True):
        assert torch.equal(a, b)
    # Evicted states are recomputed one row at a time (no padding), which moves float rounding a little;
    # AdamW's normalised steps carry that into the weights at the 1e-5 level.
    assert torch.allclose(torch.tensor(cached_loss), torch.tensor(tiny_loss), atol=1e-5)
    for a, b in zip(cached_w, tiny_w, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert tiny._bytes <= tiny.max_bytes


def test_training_on_cached_bf16_trunk_equals_recomputing_it(tiny_backbone):
    cached_loss, cached_w = _train(tiny_backbone, TrunkCache(), "bfloat16")
    plain_loss, plain_w = _train(tiny_backbone, RecomputeTrunk(), "bfloat16")
    assert torch.allclose(torch.tensor(cached_loss), torch.tensor(plain_loss), atol=1e-4)
    for a, b in zip(cached_w, plain_w, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_trunk_cache_hits_across_epochs_and_stays_bounded(tiny_backbone):
    bank = _bank(tiny_backbone)
    items = [encode_record(bank.tokenizer, r, 64) for r in length_records(6, seed=9)]
    inputs = [e for it in items for e in it.inputs]
    cache = TrunkCache()
    first = cache.get(bank, inputs)
    again = cache.get(bank, inputs)
    assert cache.misses == len(set(e.input_ids for e in inputs)) and cache.hits == len(inputs)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # States padded back into a batch equal a fresh trunk pass over that batch.
    states, mask = pad_states(first[:4])
    batch = collate(inputs[:4], bank.tokenizer.pad_token_id)
    fresh = bank.trunk(batch["input_ids"], batch["attention_mask"])
    real = mask.bool()
    assert torch.equal(mask, batch["attention_mask"])
    assert torch.allclose(states[real], fresh[real], atol=1e-5)
    bounded = TrunkCache(max_bytes=2 * first[0].numel() * first[0].element_size())
    bounded.get(bank, inputs)
    assert bounded._bytes <= bounded.max_bytes and len(bounded) < len(inputs)


@pytest.mark.parametrize("top_layers", [1, 2])
def test_last_token_path_equals_the_full_top_under_both_paddings_with_gradients(tiny_backbone, top_layers):
    """Issue 6: the last layer computed for the last position only equals the full top (values and LoRA
    gradients), right- and left-padded, for one expert and for a mixed-adapter batch."""
    torch.manual_seed(0)
    cfg = BackboneConfig(
        backbone=tiny_backbone, num_top_layers=top_layers, trunk_dtype="float32", max_length=64
    )
    bank = ExpertBank(cfg, init_lora_weights=False)
    for name in NAMES:
        bank.add_expert(name)
    bank.eval()  # PEFT's mixed-adapter batches are inference only
    assert bank.backbone.last_token_path
    batch = _batch(bank.tokenizer, n=6)
    right = batch["attention_mask"]
    shift = [int((m == 0).sum()) for m in right]
    left_ids = torch.stack([torch.roll(r, s) for r, s in zip(batch["input_ids"], shift)])
    left = torch.stack([torch.roll(m, s) for m, s in zip(right, shift)])
    for ids, mask in ((batch["input_ids"], right), (left_ids, left)):
        with torch.no_grad():
            states = bank.trunk(ids, mask)
            for name in NAMES:  # float32 values first: the path scoring and training use
                bank._activate(name)
                fast = bank.backbone.top_last_token(states, mask)
                assert torch.allclose(fast, last_token_pool(bank.backbone.top(states, mask), mask), atol=1e-5)
        # Gradients in float64: this tiny random net's float32 gradients differ between any two summation
        # orders by ~1e-3 relative, in float64 the two paths agree to ~1e-15.
        bank.double()
        states = states.double()
        bank._activate("e1")
        params = [p for n, p in bank.named_parameters() if ".e1." in n and "lora_" in n]
        assert params
        for p in params:
            p.requires_grad_(True)
        fast = bank.backbone.top_last_token(states, mask)  # [B, H]
        full = last_token_pool(bank.backbone.top(states, mask), mask)
        assert torch.allclose(fast, full, atol=1e-12)
        g_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True)
        g_full = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
        for a, b in zip(g_fast, g_full):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, atol=1e-12)
        bank.float()
        states = states.float()
        with torch.no_grad():
            mixed = bank.all_experts_hidden(states, mask, NAMES)  # [K, B, H], mixed-adapter batch
            for i, name in enumerate(NAMES):
                bank._activate(name)
                ref = last_token_pool(bank.backbone.top(states, mask), mask)
                assert torch.allclose(mixed[i], ref, atol=1e-5)
