"""Local judge speed: prefix key/value-cache reuse vs full prompts, side by side.

For each of N real pairs (PandaLM by default) and both orders, the judge asks about K capability points of
one category. With reuse, the shared prefix (system prompt, conversation, both responses) runs once per
order and only the K questions run on top of a copy of its key/value cache; without it, every
(prefix + question) row runs in full in left-padded batches. No judge cache is used, so both sides compute
everything; the two sides' margins are compared to show they agree.

It also times the generation baseline (greedy ``generate`` of up to ``--generate-tokens`` tokens per full
prompt, then parsing the text, as an API judge answers) against reading the answer-token logits.

    .venv/bin/python benchmarks/bench_judge.py                      # SmolLM2-135M-Instruct, bf16, 4 pairs
    .venv/bin/python benchmarks/bench_judge.py --pairs 8 --dtype float32 --model /path/to/model
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


def _generate(judge: LocalJudge, reqs: list[JudgeRequest], cat: Category, max_new_tokens: int):
    """The generation baseline: greedy-generate up to ``max_new_tokens`` for every full prompt (as an API
    judge would), then parse the answer. Returns (seconds, choices)."""
    import torch

    tok, model = judge._tokenizer, judge._model
    rows = []
    for r in reqs:
        parts = judge.prompts.pairwise(r.conversation, r.first, r.second, cat, cat.capabilities)
        head, tail = judge._render(parts.system, parts.prefix)
        rows += [tok.encode(head + q + tail, add_special_tokens=False) for q in parts.questions]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    choices: list[str | None] = [None] * len(rows)
    t = time.perf_counter()
    for s in range(0, len(order), judge.batch_size):
        idx = order[s : s + judge.batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), judge._pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=judge._pad_id,
            )  # fmt: skip
        for j, i in enumerate(idx):
            choices[i] = judge.prompts.parse_choice(tok.decode(out[j, width:], skip_special_tokens=True))
    return time.perf_counter() - t, choices


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: bundled SmolLM2-135M-Instruct")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--capabilities", type=int, default=4, help="capability points per question (K)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--generate-tokens", type=int, default=8,
        help="the generation baseline's max_new_tokens (0 skips it)",
    )  # fmt: skip
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
    gen_s, gen_choices = None, []
    for _ in range(args.repeats if args.generate_tokens > 0 else 0):
        s, gen_choices = _generate(judge, reqs, cat, args.generate_tokens)
        gen_s = s if gen_s is None else min(gen_s, s)
    n_q = len(reqs) * len(cat.capabilities)
    max_diff = max(abs(a - b) for a, b in zip(margins[False], margins[True], strict=True))
    print(f"model={judge.model_path} dtype={args.dtype} torch_threads={_threads()}")
    print(
        f"pairs={args.pairs} orders=2 capabilities={len(cat.capabilities)} questions={n_q} "
        f"mean_prefix_tokens={prefix_tokens / len(reqs):.0f}"
    )
    print(f"{'mode':<24}{'seconds':>10}{'questions/s':>14}{'pairs/s':>10}")
    rows = [("logits, full prompts", results[False]), ("logits, prefix reuse", results[True])]
    if gen_s is not None:
        rows.append((f"generate {args.generate_tokens} tokens", gen_s))
    for name, s in rows:
        print(f"{name:<24}{s:>10.2f}{n_q / s:>14.1f}{args.pairs / s:>10.2f}")
    print(
        f"time ratio full prompts / prefix reuse = {results[False] / results[True]:.2f}; "
        f"max |margin difference| = {max_diff:.4f}"
    )
    if gen_s is not None:
        print(
            f"time ratio generate / logits (full prompts) = {gen_s / results[False]:.2f}; "
            f"generate / logits (prefix reuse) = {gen_s / results[True]:.2f}"
        )
        argmax = ["1" if m >= 0 else "2" for m in margins[True]]
        parsed = [c for c in gen_choices if c is not None]
        same = sum(g == a for g, a in zip(gen_choices, argmax, strict=True) if g is not None)
        print(
            f"generated answers: {len(gen_choices) - len(parsed)} of {len(gen_choices)} unparseable; "
            f"{same} of {len(parsed)} parsed ones equal the logit argmax"
        )
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
