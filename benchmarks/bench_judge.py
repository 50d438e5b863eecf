"""Local judge speed: prefix key/value-cache reuse vs full prompts, side by side.

For each of N real pairs (PandaLM by default) and both orders, the judge asks about K capability points of
one category. With reuse, the shared prefix (system prompt, conversation, both responses) runs once per
order and only the K questions run on top of a copy of its key/value cache; without it, every
(prefix + question) row runs in full in left-padded batches. No judge cache is used, so both sides compute
everything; the two sides' margins are compared to show they agree.

    .venv/bin/python benchmarks/bench_judge.py                      # SmolLM2-135M-Instruct, bf16, 8 pairs
    .venv/bin/python benchmarks/bench_judge.py --pairs 4 --dtype float32 --model /path/to/model
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

from dmoerm.data import Message
from dmoerm.labelling.judge import JudgeRequest
from dmoerm.labelling.local import LocalJudge
from dmoerm.taxonomy import Capability, Category

_FALLBACK_CATEGORY = Category(
    name="chat",
    description="Open-ended conversation and requests for help.",
    capabilities=(
        Capability("instruction_following", "follows every explicit and implicit instruction of the user"),
        Capability("correctness", "states facts and reasoning that are correct"),
        Capability("relevance", "stays on the user's request without irrelevant content"),
        Capability("clarity", "is well organised, concise and easy to read"),
    ),
)


def _pairs(n: int) -> list[tuple[tuple[Message, ...], str, str]]:
    """N PandaLM pairs, through dmoerm.data.load_source when it exists, else the raw bundled file."""
    try:
        from dmoerm.data import load_source  # type: ignore[attr-defined]

        recs = list(load_source("pandalm/test", limit=n))
        return [(r.conversation, r.responses[0], r.responses[1]) for r in recs[:n]]
    except (ImportError, AttributeError):
        pass
    root = Path(os.environ.get("DMOERM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    out = []
    with gzip.open(root / "pandalm" / "testset.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            prompt = d["instruction"] + (("\n\n" + d["input"]) if d.get("input") else "")
            out.append(((Message("user", prompt),), d["response1"], d["response2"]))
            if len(out) == n:
                break
    return out


def _category(k: int) -> Category:
    try:
        from dmoerm.taxonomy import load_taxonomy  # type: ignore[attr-defined]

        tax = load_taxonomy("default")
        cat = max(tax.categories, key=lambda c: len(c.capabilities))
        return Category(cat.name, cat.description, cat.capabilities[:k], cat.description_zh)
    except (ImportError, AttributeError, FileNotFoundError):
        return Category(
            _FALLBACK_CATEGORY.name, _FALLBACK_CATEGORY.description, _FALLBACK_CATEGORY.capabilities[:k]
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: bundled SmolLM2-135M-Instruct")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--capabilities", type=int, default=4, help="capability points per question (K)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)

    cat = _category(args.capabilities)
    reqs = []
    for conv, r1, r2 in _pairs(args.pairs):
        reqs.append(JudgeRequest(conv, r1, r2, cat, cat.capabilities))
        reqs.append(JudgeRequest(conv, r2, r1, cat, cat.capabilities))
    results = {}
    margins = {}
    for reuse in (False, True):
        judge = LocalJudge(args.model, dtype=args.dtype, batch_size=args.batch_size, reuse_prefix=reuse)
        judge.load()
        judge.score_requests(reqs[:2])  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = judge.score_requests(reqs)
            best = min(best, time.perf_counter() - t)
        results[reuse] = best
        margins[reuse] = [v.margin for vs in out for v in vs]
        prefix_tokens = sum(
            len(judge._tokenizer.encode(judge._render(p.system, p.prefix)[0], add_special_tokens=False))
            for p in (
                judge.prompts.pairwise(r.conversation, r.first, r.second, cat, cat.capabilities) for r in reqs
            )
        )
    n_q = len(reqs) * len(cat.capabilities)
    max_diff = max(abs(a - b) for a, b in zip(margins[False], margins[True], strict=True))
    print(f"model={judge.model_path} dtype={args.dtype} torch_threads={_threads()}")
    print(
        f"pairs={args.pairs} orders=2 capabilities={len(cat.capabilities)} questions={n_q} "
        f"mean_prefix_tokens={prefix_tokens / len(reqs):.0f}"
    )
    print(f"{'mode':<14}{'seconds':>10}{'questions/s':>14}{'pairs/s':>10}")
    for reuse in (False, True):
        s = results[reuse]
        print(
            f"{'prefix reuse' if reuse else 'full prompts':<14}{s:>10.2f}{n_q / s:>14.1f}{args.pairs / s:>10.2f}"
        )
    print(
        f"speed-up (full / reuse) = {results[False] / results[True]:.2f}x; max |margin difference| = {max_diff:.4f}"
    )
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
