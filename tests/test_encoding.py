import torch

from dmoerm.data import Message
from dmoerm.encoding import EncodedInput, collate, encode, length_buckets, render


def test_collate_exact_tensors():
    batch = collate([EncodedInput((5, 6, 7), 2), EncodedInput((8,), 1)], pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([[1, 1, 0], [1, 0, 0]]))


def test_render_keeps_multi_turn_and_prompt_is_prefix(tiny_backbone):
    from dmoerm.backbone import load_tokenizer

    tok = load_tokenizer(tiny_backbone)
    conv = [
        Message("user", "first question"),
        Message("assistant", "first answer"),
        Message("user", "second"),
    ]
    prompt, suffix = render(tok, conv, "the reply")
    assert "first question" in prompt and "first answer" in prompt and prompt.endswith("assistant\n")
    assert suffix == "the reply<|im_end|>\n"
    enc = encode(tok, conv, "the reply", 512)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids[: enc.prompt_length]) == prompt_ids


def test_truncation_keeps_response_end_and_some_prompt(tiny_backbone):
    from dmoerm.backbone import load_tokenizer

    tok = load_tokenizer(tiny_backbone)
    conv = [Message("user", "word " * 200)]
    enc = encode(tok, conv, "short answer END", 40)
    assert enc.prompt_length == 20  # half the limit, whatever the response
    assert tok.decode(enc.input_ids).endswith("short answer END<|im_end|>\n")
    long = encode(tok, [Message("user", "question?")], "blah " * 300 + "FINAL", 40)
    assert len(long.input_ids) == 40 and long.prompt_length >= 1
    assert "FINAL<|im_end|>" in tok.decode(long.input_ids)


def test_prompt_window_does_not_depend_on_the_response(tiny_backbone):
    """Every response to one prompt carries the same prompt tokens (so they share the router's features)."""
    from dmoerm.backbone import load_tokenizer
    from dmoerm.encoding import encode_prompt

    tok = load_tokenizer(tiny_backbone)
    for words in (3, 15, 200):
        conv = [Message("user", "word " * words)]
        windows = {
            encode(tok, conv, resp, 48).input_ids[: encode(tok, conv, resp, 48).prompt_length]
            for resp in ("ok", "blah " * 5, "blah " * 300)
        }
        assert len(windows) == 1
        assert windows == {encode_prompt(tok, conv, 48).input_ids}


def test_length_buckets_sort_by_length():
    assert length_buckets([5, 1, 3, 2], 2) == [[1, 3], [2, 0]]
