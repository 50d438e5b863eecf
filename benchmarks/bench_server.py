"""Reward server throughput under concurrent load, side by side with in-process batch scoring.

The same inputs are scored twice: (1) in this process with ``scorer.score(...)`` in batches (the ceiling),
and (2) through the HTTP server (:mod:`dmoerm.serving`, run in a child process) by ``--clients`` concurrent
clients, each sending requests of ``--items-per-request`` items to ``POST /score`` (or ``/get_reward`` with
``--endpoint get_reward``). The ratio server/in-process is the figure of merit (goal: >= 0.8). The rewards
of both paths are compared too.

    .venv/bin/python benchmarks/bench_server.py                        # tiny random model built in code
    .venv/bin/python benchmarks/bench_server.py --backbone /path/to/hf_model_dir   # real backbone, random head
    .venv/bin/python benchmarks/bench_server.py --model-dir /path/to/trained_reward_model

The default model is a random Llama (hidden 256, 4 layers) with a byte-level BPE tokenizer trained in code,
so the benchmark needs no download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the quick brown fox jumps over lazy dog answer question clearly politely capital france paris water "
    "boils degrees celsius function returns sum sorry cannot help request poem spring rain leaves green "
    "explain why how what when please write short story about robot learning to paint"
).split()


def build_tiny_model(folder: Path, hidden: int, layers: int) -> str:
    """A random Llama and a byte-level BPE tokenizer with a ChatML template, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(_WORDS)] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = _TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class BackboneScorer:
    """A backbone with a random (seeded) linear value head at the last real token; a dmoerm Scorer."""

    def __init__(self, backbone: str, max_length: int = 512, seed: int = 0) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(backbone)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(backbone, dtype=torch.float32).eval()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(self.model.config.hidden_size, 1)
        self.max_length = max_length

    def render(self, conversation, response: str) -> str:
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        return self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )

    def score_texts(self, texts: list[str], batch_size: int = 16) -> list[float]:
        torch = self.torch
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_length :] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length buckets: little padding
        out = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]
                for row, r in zip(idx, self.head(last)[:, 0].tolist(), strict=True):
                    out[row] = r
        return out

    def score(self, conversations, responses, batch_size: int = 16):
        from dmoerm.outputs import RewardOutput

        texts = [self.render(c, r) for c, r in zip(conversations, responses, strict=True)]
        return [RewardOutput(reward=r) for r in self.score_texts(texts, batch_size)]


def make_scorer(args: argparse.Namespace):
    if args.model_dir:
        from dmoerm.model import load_model

        return load_model(args.model_dir)  # a single RM or a DMoERM
    return BackboneScorer(args.backbone_path, max_length=args.max_length)


def make_inputs(n: int, seed: int = 0):
    """N (conversation, response) pairs of varied length, some multi-turn."""
    import random

    from dmoerm.data import Message

    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    convs, resps = [], []
    for i in range(n):
        conv = [Message("user", sentence(5, 40))]
        if i % 3 == 0:
            conv += [Message("assistant", sentence(5, 30)), Message("user", sentence(3, 20))]
        convs.append(conv)
        resps.append(sentence(10, 80))
    return convs, resps


def _serve_child(args: argparse.Namespace, port: int) -> None:
    import logging

    import torch

    from dmoerm.serving import ServeConfig, serve

    logging.basicConfig(level=logging.WARNING)
    _quiet_transformers()
    torch.set_num_threads(args.torch_threads)
    scorer = make_scorer(args)
    config = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        scorer_batch_size=args.batch_size,
        log_level="warning",
        torch_threads=args.torch_threads,
    )
    serve(scorer, host="127.0.0.1", port=port, config=config)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, convs, resps, scorer_texts, args) -> tuple[float, list[float], dict]:
    import httpx

    k = args.items_per_request
    chunks = [(i, min(i + k, len(resps))) for i in range(0, len(resps), k)]
    rewards: list[float] = [float("nan")] * len(resps)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    queue: asyncio.Queue = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await client.post("/get_reward", json={"query": ["warm up"]})
        before = (await client.get("/stats")).json()

        async def worker() -> None:
            while not queue.empty():
                a, b = queue.get_nowait()
                if args.endpoint == "score":
                    payload = {
                        "items": [
                            {
                                "conversation": [{"role": m.role, "content": m.content} for m in convs[i]],
                                "response": resps[i],
                            }
                            for i in range(a, b)
                        ]
                    }
                    r = await client.post("/score", json=payload)
                    r.raise_for_status()
                    rewards[a:b] = [x["reward"] for x in r.json()["results"]]
                else:
                    r = await client.post("/get_reward", json={"query": scorer_texts[a:b]})
                    r.raise_for_status()
                    rewards[a:b] = r.json()["rewards"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        elapsed = time.perf_counter() - t0
        after = (await client.get("/stats")).json()
    batches = after["batches"] - before["batches"]
    items = after["items_scored"] - before["items_scored"]
    return elapsed, rewards, {"batches": batches, "mean_batch_items": items / max(batches, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", help="HF model folder (random value head); default: a tiny random model")
    p.add_argument("--model-dir", help="a trained dmoerm reward model directory (overrides --backbone)")
    p.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny model: decoder layers")
    p.add_argument("--items", type=int, default=1024, help="inputs to score (each path scores all)")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    p.add_argument("--items-per-request", type=int, default=4)
    p.add_argument("--endpoint", choices=("score", "get_reward"), default="score")
    p.add_argument("--batch-size", type=int, default=32, help="scorer forward batch size (both paths)")
    p.add_argument("--max-batch-size", type=int, default=64, help="server: items merged per scorer call")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads, both paths (server process too)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each path (best is kept)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    _quiet_transformers()
    tmp = tempfile.TemporaryDirectory(prefix="bench_server_")
    if args.model_dir:
        args.backbone_path = None
        model_desc = f"model dir {args.model_dir}"
    elif args.backbone:
        args.backbone_path = args.backbone
        model_desc = f"backbone {args.backbone} + random head"
    else:
        args.backbone_path = build_tiny_model(Path(tmp.name) / "tiny", args.hidden, args.layers)
        model_desc = f"tiny random Llama (hidden {args.hidden}, {args.layers} layers)"

    scorer = make_scorer(args)
    convs, resps = make_inputs(args.items)
    texts = (
        [scorer.render(c, r) for c, r in zip(convs, resps, strict=True)] if hasattr(scorer, "render") else []
    )
    if args.endpoint == "get_reward" and not texts:
        p.error("--endpoint get_reward needs a scorer with render(); use --endpoint score")

    # In-process: the same inputs, one call, scorer batches of --batch-size.
    scorer.score(convs[:8], resps[:8], batch_size=args.batch_size)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        local = [o.reward for o in scorer.score(convs, resps, batch_size=args.batch_size)]
        times.append(time.perf_counter() - t0)
    local_s = min(times)
    del scorer  # free the memory before the server process loads its copy

    ctx = mp.get_context("spawn")
    port = _free_port()
    child = ctx.Process(target=_serve_child, args=(args, port), daemon=True)
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not child.is_alive():
                print("the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        # As many timed passes as in process, best kept, so both paths are measured alike.
        server_s, remote, batching, server_times = float("inf"), [], {}, []
        for _ in range(args.repeats):
            s, r, b = asyncio.run(_load(url, convs, resps, texts, args))
            server_times.append(s)
            if s < server_s:
                server_s, remote, batching = s, r, b
    finally:
        child.terminate()
        child.join(10)
        tmp.cleanup()

    max_diff = max(abs(a - b) for a, b in zip(local, remote, strict=True))
    local_rate = args.items / local_s
    server_rate = args.items / server_s
    figures = {
        "model": model_desc,
        "items": args.items,
        "clients": args.clients,
        "items_per_request": args.items_per_request,
        "endpoint": args.endpoint,
        "torch_threads": args.torch_threads,
        "in_process_items_per_s": round(local_rate, 1),
        "server_items_per_s": round(server_rate, 1),
        "server_requests_per_s": round(server_rate / args.items_per_request, 1),
        "ratio": round(server_rate / local_rate, 3),
        "server_batches": batching["batches"],
        "server_mean_batch_items": round(batching["mean_batch_items"], 1),
        "max_abs_reward_diff": max_diff,
        "in_process_runs_s": [round(t, 3) for t in times],
        "in_process_stdev_s": round(statistics.pstdev(times), 3),
        "server_runs_s": [round(t, 3) for t in server_times],
    }
    print(f"model: {model_desc}; {args.items} items, torch threads {args.torch_threads}")
    print(f"{'path':<42}{'items/s':>10}")
    local_label = f"in-process score(batch_size={args.batch_size})"
    print(f"{local_label:<42}{local_rate:>10.1f}")
    label = f"server /{args.endpoint}, {args.clients} clients x {args.items_per_request} items"
    print(f"{label:<42}{server_rate:>10.1f}")
    print(f"ratio server / in-process: {server_rate / local_rate:.3f}  (goal >= 0.8)")
    print(
        f"server batches: {batching['batches']} (mean {batching['mean_batch_items']:.1f} items); "
        f"max |reward difference|: {max_diff:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if max_diff < 1e-4 else 2


if __name__ == "__main__":
    sys.exit(main())
