"""Shared fixtures: a tiny random Llama backbone with a byte-level BPE tokenizer and a ChatML template.

Everything is built in code (no downloads) and saved to a folder, so tests go through the same
``from_pretrained`` path as a real backbone.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question clearly and politely.",
    "def add(a, b):\n    return a + b\n",
    "Which response is better in terms of empathy? Answer 1 or 2.",
    "I am sorry, but I cannot help with that request.",
    "Paris is the capital of France. Water boils at 100 degrees Celsius.",
    "你好，今天天气很好。请写一首关于春天的诗。",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_backbone(
    folder, *, hidden_size: int = 32, num_layers: int = 4, seed: int = 0, tie_word_embeddings: bool = True
) -> str:
    """Save a tiny random LlamaForCausalLM and its tokenizer to ``folder``; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """Path of a tiny random Llama backbone folder (hidden 32, 4 layers), built once per test session."""
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs, restored afterwards. On a busy 2-core machine two OpenMP threads
    spin-wait on each other and make the tiny models' small matmuls many times slower; results do not change."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir():
    """The real data folder (DMOERM_DATA_DIR or ./shared/data or ../shared/data); skip when absent."""
    from dmoerm.data import default_data_dir

    try:
        return default_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"no data folder: {e}")
