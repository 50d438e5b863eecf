"""Scoring cost, side by side: a single reward model, DMoERM in one pass, and the naive K+1-pass DMoERM.

All three read the same backbone (the default SmolLM2-135M-Instruct unless --backbone), the same encoded inputs
(both responses of N bundled RMB records of one category) and the same batch size:

- single: ``RewardModel.rewards``: the bf16 trunk once, then the top layers with one LoRA adapter, value head.
- dmoerm: ``DMoERM.score_inputs``: the router on the same trunk states, all K capability experts of the routed
  category in one mixed-adapter batch over the top layers, the MLP aggregator.
- likelihood (with ``--likelihood``): ``dmoerm`` with the backbone's likelihood term on (``likelihood.fit``;
  docs/likelihood.md): also the top layers with no adapter at every position and the LM head over every
  response token.
- naive: the paper's way: a router pass over the whole backbone, then K whole-backbone passes with
  ``set_adapter`` per expert, then the aggregator. Its rewards are checked against ``dmoerm``'s.

Adapters, heads, router and aggregator are randomly initialised: the cost does not depend on trained weights.
The router's bias sends every row to ``--category`` (K = its capability points; ``code`` has 5), the case
where every row pays for the largest inner model. Timings are interleaved over ``--rounds`` rounds (the median
counts), so load from other work on the machine hits all three alike. Peak memory is measured for each
variant in a fresh subprocess (VmHWM after resetting it once the model is loaded, on CPU; ``torch.cuda.max_memory_allocated`` on a GPU).

    .venv/bin/python benchmarks/bench_scoring.py                        # 8 records (16 inputs), 256 tokens
    .venv/bin/python benchmarks/bench_scoring.py --records 24 --rounds 5 --threads 2
    .venv/bin/python benchmarks/bench_scoring.py --likelihood --no-naive --no-memory
    .venv/bin/python benchmarks/bench_scoring.py --device cuda          # full size: 512 records, 1024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from peak_memory import reset_peak_rss, rss_mib

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("single", "dmoerm", "likelihood", "naive")


# ------------------------------------------------------------------------------------------------- setup
def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="default", help="backbone folder or hub id (default: bundled)")
    ap.add_argument("--source", default="rmb/pairwise", help="bundled preference source (dmoerm.data)")
    ap.add_argument("--category", default="code", help="taxonomy category whose records are scored")
    ap.add_argument("--records", type=int, default=None, help="records scored (2 inputs each); default 8")
    ap.add_argument("--max-length", type=int, default=None, help="token limit; default 256 (cuda: 1024)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=2, help="top layers carrying LoRA (library default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see RESULTS.md)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--bf16-top",
        action="store_true",
        help="run every variant under bf16 autocast (the top layers too; the trunk is bf16 anyway)",
    )
    ap.add_argument("--no-naive", action="store_true", help="skip the naive K+1-pass variant (the slow one)")
    ap.add_argument("--likelihood", action="store_true", help="add DMoERM with the likelihood term on")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = tuple(
        v for v in VARIANTS if not (args.no_naive and v == "naive") and (args.likelihood or v != "likelihood")
    )
    full = args.device == "cuda"
    args.records = args.records or (512 if full else 8)
    args.max_length = args.max_length or (1024 if full else 256)
    return args


def _load_inputs(args, tokenizer):
    from dmoerm.data import load_source
    from dmoerm.encoding import encode_record
    from dmoerm.taxonomy import assign_categories, load_taxonomy

    taxonomy = load_taxonomy("default")
    limit = None if args.device == "cuda" else max(2000, 40 * args.records)  # code: ~1 in 3 of RMB's first
    loaded = assign_categories(load_source(args.source, limit=limit), taxonomy)
    records = [r for r in loaded if r.category == args.category]
    if len(records) < args.records:
        print(f"note: {args.source} has {len(records)} {args.category} records; using all of them")
    items = [encode_record(tokenizer, r, args.max_length) for r in records[: args.records]]
    return taxonomy, [e for item in items for e in item.inputs]


def _build(args, variant: str):
    """(model, inputs) for one variant; ``dmoerm`` and ``naive`` share a DMoERM, ``single`` a RewardModel."""
    import torch

    from dmoerm.aggregator import Aggregator
    from dmoerm.experts import BackboneConfig, ExpertBank
    from dmoerm.model import DMoERM, capability_expert_name
    from dmoerm.reward_model import RewardModel

    torch.manual_seed(0)
    config = BackboneConfig(
        backbone=args.backbone, num_top_layers=args.top_layers, max_length=args.max_length
    )
    bank = ExpertBank(config, init_lora_weights=False)  # random A and B: every expert differs
    taxonomy, inputs = _load_inputs(args, bank.tokenizer)
    if variant == "single":
        model = RewardModel(bank)
    else:
        others = [c.name for c in taxonomy.categories if c.name != args.category][:1]
        model = DMoERM(bank, taxonomy, [args.category, *others])
        for category in model.categories:
            caps = next(c for c in taxonomy.categories if c.name == category).capabilities
            names = [capability_expert_name(category, c.name) for c in caps]
            for name in names:
                bank.add_expert(name)
            model.aggregators[category] = Aggregator(len(names), bank.hidden_size)
            model.aggregator_experts[category] = names
        with torch.no_grad():
            model.router.head.bias.zero_()
            model.router.head.bias[0] = 50.0  # every row goes to --category
        if variant == "likelihood":
            model.likelihood_weights = {c: -0.5 for c in model.categories}
    model.requires_grad_(False)
    model.eval()
    if args.device == "cuda":
        model.to("cuda")
    return model, inputs


# ------------------------------------------------------------------------------------------------- variants
def naive_scores(model, inputs, batch_size: int):
    """The paper's way: a router pass and K whole-backbone passes (``set_adapter`` each), then the aggregator."""
    import torch

    from dmoerm.backbone import last_token_pool
    from dmoerm.encoding import collate, length_buckets

    bank = model.bank
    peft = bank.peft_model
    out = torch.empty(len(inputs))
    with torch.no_grad():
        for idx in length_buckets([len(e.input_ids) for e in inputs], batch_size):
            batch = collate([inputs[i] for i in idx], bank.tokenizer.pad_token_id)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            # Router: its own pass (a separate classifier over the backbone in the paper), without adapters.
            with peft.disable_adapter():
                trunk = bank.backbone.trunk(ids, mask)
                bank.backbone.top(trunk, mask)
            route = model.router.probabilities(model.router.features(trunk, batch["prompt_mask"])).argmax(-1)
            reward = torch.zeros(len(idx))
            for c, category in enumerate(model.categories):
                rows = (route == c).nonzero().squeeze(-1)
                if rows.numel() == 0:
                    continue
                hidden = []
                for name in model.aggregator_experts[category]:
                    peft.set_adapter(name)
                    final = bank.backbone(ids[rows], mask[rows])  # the whole backbone again
                    hidden.append(last_token_pool(final, mask[rows]))
                reward[rows] = model.aggregators[category](torch.stack(hidden)).float()
            out[idx] = reward
    return out


def _run(variant: str, model, inputs, batch_size: int, bf16_top: bool = False):
    import torch

    if bf16_top:
        device = next(model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return _run(variant, model, inputs, batch_size).float()
    if variant == "single":
        return model.rewards(inputs, batch_size)
    if variant in ("dmoerm", "likelihood"):
        model.likelihood_weights = {c: -0.5 for c in model.categories} if variant == "likelihood" else {}
        return torch.tensor([o.reward for o in model.score_inputs(inputs, batch_size)])
    return naive_scores(model, inputs, batch_size)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _worker(args) -> None:
    """One variant in a fresh process: peak memory after loading and after scoring, as a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    model, inputs = _build(args, args.worker)
    import gc

    gc.collect()
    load_peak = rss_mib("VmHWM")
    loaded = rss_mib("VmRSS")
    reset = reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _run(args.worker, model, inputs, args.batch_size, args.bf16_top)
    _sync(args.device)
    info = {
        "variant": args.worker,
        "rss_load_peak_mib": load_peak,
        "rss_loaded_mib": loaded,
        "rss_peak_mib": rss_mib("VmHWM") if reset else float("nan"),
    }
    if args.device == "cuda":
        info["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(info), flush=True)


def _memory(args, argv: list[str]) -> dict[str, dict]:
    out = {}
    for variant in args.variants:
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--worker", variant],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"memory worker {variant} failed:\n{proc.stderr[-2000:]}")
            continue
        out[variant] = json.loads(lines[-1][len("RESULT ") :])
    return out


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        _worker(args)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dmoerm, inputs = _build(args, "dmoerm")
    single = _build(args, "single")[0]
    models = {"single": single, "dmoerm": dmoerm, "likelihood": dmoerm, "naive": dmoerm}
    tokens = sum(len(e.input_ids) for e in inputs)
    k = len(dmoerm.aggregator_experts[args.category])
    print(
        f"backbone {args.backbone}: {dmoerm.bank.backbone.num_layers} layers ({args.top_layers} on top), "
        f"hidden {dmoerm.bank.hidden_size}; {len(inputs)} inputs ({tokens} tokens, max {args.max_length}) of "
        f"{args.category} (K={k} experts); batch {args.batch_size}; {args.threads} thread(s); {args.device}"
        + ("; bf16 autocast" if args.bf16_top else "")
    )
    variants = args.variants
    for variant in variants:  # warm-up (first-call allocations, kernel selection)
        _run(variant, models[variant], inputs[:2], args.batch_size, args.bf16_top)
    times: dict[str, list[float]] = {v: [] for v in variants}
    results = {}
    for r in range(args.rounds):
        shift = r % len(variants)  # rotate, so no variant always runs first
        order = variants[shift:] + variants[:shift]
        for variant in order:
            _sync(args.device)
            t = time.perf_counter()
            results[variant] = _run(variant, models[variant], inputs, args.batch_size, args.bf16_top)
            _sync(args.device)
            times[variant].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants), flush=True)
    med = {v: statistics.median(times[v]) for v in variants}
    if "naive" in results:
        agree = float((results["dmoerm"] - results["naive"]).abs().max())
        print(f"\nmax |dmoerm - naive| reward: {agree:.2e} (the same model computed both ways)")
    print(f"{'variant':<8} {'median s':>9} {'min s':>7} {'tokens/s':>9}")
    for v in variants:
        print(f"{v:<8} {med[v]:>9.2f} {min(times[v]):>7.2f} {tokens / med[v]:>9.1f}")
    print(f"\nDMoERM (single pass) / single RM : {med['dmoerm'] / med['single']:.2f}x   (goal <= 1.3x)")
    if "likelihood" in med:
        print(f"DMoERM + likelihood / DMoERM      : {med['likelihood'] / med['dmoerm']:.2f}x")
        print(f"DMoERM + likelihood / single RM   : {med['likelihood'] / med['single']:.2f}x")
    if "naive" in med:
        print(f"naive K+1-pass DMoERM / DMoERM   : {med['naive'] / med['dmoerm']:.2f}x")
        print(f"naive K+1-pass DMoERM / single RM: {med['naive'] / med['single']:.2f}x   (K+1 = {k + 1})")
    if not args.no_memory:
        mem = _memory(args, argv)
        print("\npeak resident memory, each variant in a fresh process (MiB; peak mark reset after loading):")
        for v, info in mem.items():
            extra = f", cuda peak {info['cuda_peak_mib']:.0f}" if "cuda_peak_mib" in info else ""
            print(
                f"{v:<8} loaded {info['rss_loaded_mib']:.0f} (loading peak {info['rss_load_peak_mib']:.0f}), "
                f"peak while scoring {info['rss_peak_mib']:.0f} "
                f"(+{info['rss_peak_mib'] - info['rss_loaded_mib']:.0f}){extra}"
            )
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
