"""Training throughput and peak memory, side by side: dmoerm's training paths against TRL's RewardTrainer.

Every variant trains on the same backbone (the default SmolLM2-135M-Instruct unless --backbone), the same
token sequences (N bundled RMB pairwise records of one category, encoded once by dmoerm and given to TRL
pre-tokenized), the same batch size (records of two responses per step), max length, epochs and learning rate:

- ``single``: dmoerm's single reward model (``train_expert``): LoRA on the top layers, the frozen bf16 trunk
  computed once into a ``TrunkCache`` and reused by every epoch.
- ``single_nocache``: the same loop with the trunk recomputed for every batch (the cache off).
- ``pipeline``: DMoERM's three phases for the category: phase 1 (its reward model) on the records, phase 2 (one
  expert per capability point, K of them, each started from phase 1 and trained on ``--label-records`` of the
  phase-1 records, as the pipeline's judge labels are), phase 3 (the MLP aggregator over the K experts'
  states on ``--phase3-records`` further records). One trunk cache serves all phases.
- ``pipeline_nocache``: the same with the trunk recomputed for every batch.
- ``trl``: TRL 1.16 ``RewardTrainer`` with its defaults (bf16 autocast, gradient checkpointing) and LoRA on
  every linear layer of every decoder layer (``target_modules="all-linear"``), rank and alpha as dmoerm's.
- ``trl_nogc``: the same without gradient checkpointing (faster when memory allows).

Trained tokens: the real (non-pad) tokens of every sequence in every training step, summed over epochs; for the
pipeline, phases 1 and 2 count this way and phase 3 counts its inputs once (the K experts' forward pass; the
aggregator's epochs over the cached expert states are nearly free and add nothing). Time: wall time of
training only (model loading and tokenization excluded; the trunk pass into the cache included). Each variant
runs in a fresh subprocess (so peak memory is its own: VmHWM reset after loading, on CPU).

    .venv/bin/python benchmarks/bench_training.py                   # 24 records of code, 256 tokens, 2 epochs
    .venv/bin/python benchmarks/bench_training.py --variants single,trl_nogc --records 48
    .venv/bin/python benchmarks/bench_training.py --device cuda     # full size: 1024 records, 1024 tokens
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from peak_memory import reset_peak_rss, rss_mib

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("single", "single_nocache", "pipeline", "pipeline_nocache", "trl", "trl_nogc")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="default", help="backbone folder or hub id (default: bundled)")
    ap.add_argument("--source", default="rmb/pairwise", help="bundled pairwise preference source")
    ap.add_argument("--category", default="code", help="taxonomy category whose records train")
    ap.add_argument(
        "--records", type=int, default=None, help="training records (phase 1 / single); default 24"
    )
    ap.add_argument(
        "--label-records", type=int, default=None, help="phase-2 records per expert; default half"
    )
    ap.add_argument(
        "--phase3-records", type=int, default=None, help="phase-3 records; default 2/3 of records"
    )
    ap.add_argument("--max-length", type=int, default=None, help="token limit; default 256 (cuda: 1024)")
    ap.add_argument("--batch-size", type=int, default=8, help="records per step (2 sequences each)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of single, phase 1, phase 2 and TRL")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--top-layers", type=int, default=2, help="top layers carrying LoRA (library default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see RESULTS.md)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    full = args.device == "cuda"
    args.records = args.records or (1024 if full else 24)
    args.max_length = args.max_length or (1024 if full else 256)
    args.label_records = args.label_records or max(1, args.records // 2)
    args.phase3_records = args.phase3_records or max(1, 2 * args.records // 3)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


# ------------------------------------------------------------------------------------------------- memory


# ------------------------------------------------------------------------------------------------- data
def _records(args):
    """(taxonomy, phase-1/single records, phase-3 records): pairwise records of --category, in file order."""
    from dmoerm.data import load_source
    from dmoerm.taxonomy import assign_categories, load_taxonomy

    taxonomy = load_taxonomy("default")
    limit = None if args.device == "cuda" else max(2000, 10 * (args.records + args.phase3_records))
    recs = [
        r
        for r in assign_categories(load_source(args.source, limit=limit), taxonomy)
        if r.category == args.category and len(r.responses) == 2 and r.pairs()
    ]
    need = args.records + args.phase3_records
    if len(recs) < need:
        print(f"note: {len(recs)} {args.category} records, fewer than the {need} asked for")
    return taxonomy, recs[: args.records], recs[args.records : need]


def _tokens(items, epochs: int = 1) -> int:
    return epochs * sum(len(e.input_ids) for item in items for e in item.inputs)


_PREFETCH = object()


class RecomputeTrunk:
    """The trunk cache turned off: every batch's trunk states are computed again, in that batch.

    ``train_expert`` first asks the cache for all its inputs at once, to fill it (the only caller that passes
    ``desc``); with no cache that call would be wasted work, so it computes nothing.
    """

    def get(self, bank, inputs, batch_size: int = 16, desc=_PREFETCH):
        from dmoerm.encoding import collate

        if desc is not _PREFETCH:
            return []  # train_expert's fill-the-cache call: nothing to keep
        inputs = list(inputs)
        batch = collate(inputs, bank.tokenizer.pad_token_id)
        states = bank.trunk(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
        return [states[i, : len(e.input_ids)] for i, e in enumerate(inputs)]


# ------------------------------------------------------------------------------------------------- variants
def _config(args):
    from dmoerm.experts import BackboneConfig

    return BackboneConfig(backbone=args.backbone, num_top_layers=args.top_layers, max_length=args.max_length)


def _train_config(args, epochs: int | None = None):
    from dmoerm.training.loop import TrainConfig

    return TrainConfig(
        epochs=epochs or args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        early_stopping_patience=0,
    )


def _ours_single(args, cached: bool) -> dict:
    from dmoerm.encoding import encode_record
    from dmoerm.reward_model import RewardModel
    from dmoerm.training.loop import train_expert
    from dmoerm.training.trunk_cache import TrunkCache

    _, recs, _ = _records(args)
    model = RewardModel.create(_config(args))
    items = [encode_record(model.tokenizer, r, args.max_length) for r in recs]
    cache = TrunkCache() if cached else RecomputeTrunk()
    loaded = _loaded()
    t = time.perf_counter()
    result = train_expert(model.bank, RewardModel.EXPERT, items, [], _train_config(args), cache)
    seconds = time.perf_counter() - t
    return {
        **loaded,
        "seconds": seconds,
        "tokens": _tokens(items, args.epochs),
        "steps": result.steps,
        "last_loss": result.history["loss"][-1],
    }


def _ours_pipeline(args, cached: bool) -> dict:
    from dmoerm.encoding import encode_record
    from dmoerm.model import new_dmoerm
    from dmoerm.training.phases import AggregatorTrainConfig, train_phase1, train_phase2, train_phase3
    from dmoerm.training.trunk_cache import TrunkCache

    taxonomy, recs, recs3 = _records(args)
    model = new_dmoerm(_config(args), taxonomy, [args.category])
    tok = model.tokenizer
    items = [encode_record(tok, r, args.max_length) for r in recs]
    items3 = [encode_record(tok, r, args.max_length) for r in recs3]
    # Phase 2's judge labels are pairs of phase-1 records (same token sequences); the human ranking stands in
    # for each capability's label here: throughput does not depend on who labelled the pair.
    labels = items[: args.label_records]
    caps = next(c for c in taxonomy.categories if c.name == args.category).capabilities
    cache = TrunkCache() if cached else RecomputeTrunk()
    loaded = _loaded()
    timings = {}
    t = time.perf_counter()
    train_phase1(model, args.category, items, [], _train_config(args), cache, progress=False)
    timings["phase1"] = time.perf_counter() - t
    for cap in caps:
        t2 = time.perf_counter()
        train_phase2(model, args.category, cap.name, labels, [], _train_config(args), cache, progress=False)
        timings[f"phase2/{cap.name}"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    train_phase3(model, args.category, items3, [], AggregatorTrainConfig(epochs=30), cache)
    timings["phase3"] = time.perf_counter() - t3
    seconds = time.perf_counter() - t
    tokens = _tokens(items, args.epochs) + len(caps) * _tokens(labels, args.epochs) + _tokens(items3)
    return {**loaded, "seconds": seconds, "tokens": tokens, "experts": len(caps), "phases": timings}


def _trl(args, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from dmoerm.backbone import load_tokenizer, resolve_backbone
    from dmoerm.encoding import encode_record
    from dmoerm.experts import BackboneConfig

    path = resolve_backbone(args.backbone)
    _, recs, _ = _records(args)
    tok = load_tokenizer(path)
    items = [encode_record(tok, r, args.max_length) for r in recs]
    chosen, rejected = [], []
    for item in items:
        (better, worse), *_ = item.pairs
        chosen.append(list(item.inputs[better].input_ids))
        rejected.append(list(item.inputs[worse].input_ids))
    data = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    defaults = BackboneConfig()  # dmoerm's LoRA rank, alpha and dropout
    peft_config = LoraConfig(
        r=defaults.lora_rank,
        lora_alpha=defaults.lora_alpha,
        lora_dropout=defaults.lora_dropout,
        target_modules="all-linear",
        task_type="SEQ_CLS",
    )
    out = tempfile.mkdtemp(prefix="bench-trl-")
    config = RewardConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        gradient_checkpointing=gradient_checkpointing,
        bf16=True,  # TRL's default; on a CPU without bf16 it falls back with a warning
        use_cpu=args.device == "cpu",
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tok.pad_token
    trainer = RewardTrainer(
        model=path,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    loaded = _loaded()
    t = time.perf_counter()
    trainer.train()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        **loaded,
        "seconds": seconds,
        "tokens": _tokens(items, args.epochs),
        "trl_counted_tokens": int(trainer._total_train_tokens),
        "steps": int(trainer.state.global_step),
        "trainable_params": trainable,
    }


_LOADED: dict = {}


def _loaded() -> dict:
    """Called once the model and data are loaded: remember the RSS, and reset the peak mark."""
    import torch

    gc.collect()
    info = {"rss_load_peak_mib": rss_mib("VmHWM"), "rss_loaded_mib": rss_mib("VmRSS")}
    _LOADED["reset"] = reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return info


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    v = args.worker
    if v.startswith("single"):
        info = _ours_single(args, cached=v == "single")
    elif v.startswith("pipeline"):
        info = _ours_pipeline(args, cached=v == "pipeline")
    else:
        info = _trl(args, gradient_checkpointing=v == "trl")
    info["variant"] = v
    info["rss_peak_mib"] = rss_mib("VmHWM") if _LOADED.get("reset") else float("nan")
    if torch.cuda.is_available() and args.device == "cuda":
        info["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(info), flush=True)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here")
            return 2
    t0 = time.perf_counter()
    print(
        f"backbone {args.backbone}; {args.records} {args.category} records (phase 2: {args.label_records} per "
        f"expert, phase 3: {args.phase3_records}); max {args.max_length} tokens; batch {args.batch_size} records; "
        f"{args.epochs} epochs; lr {args.learning_rate}; {args.threads} thread(s); {args.device}",
        flush=True,
    )
    base = [a for a in argv if not a.startswith("--variants")]
    if "--variants" in argv:  # drop "--variants X" given as two words
        i = argv.index("--variants")
        base = argv[:i] + argv[i + 2 :]
    results: dict[str, dict] = {}
    for v in args.variants:
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, *base, "--worker", v], capture_output=True, text=True, check=False
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{v}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[v] = json.loads(lines[-1][len("RESULT ") :])
        r = results[v]
        print(
            f"{v:<17} {r['seconds']:8.1f}s  {r['tokens']:7d} tokens  {r['tokens'] / r['seconds']:8.1f} tok/s  "
            f"peak RSS {r['rss_peak_mib']:.0f} MiB (loaded {r['rss_loaded_mib']:.0f})  "
            f"[{time.perf_counter() - t:.0f}s with loading]",
            flush=True,
        )
        if "phases" in r:
            print("    " + ", ".join(f"{k} {s:.1f}s" for k, s in r["phases"].items()), flush=True)
        if "trl_counted_tokens" in r:
            print(
                f"    TRL counted {r['trl_counted_tokens']} tokens; trainable {r['trainable_params']}",
                flush=True,
            )

    def rate(v: str) -> float | None:
        return results[v]["tokens"] / results[v]["seconds"] if v in results else None

    print("\nratios of trained tokens per second:")
    trls = [v for v in ("trl", "trl_nogc") if v in results]
    best_trl = max(trls, key=rate) if trls else None
    for ours in ("single", "pipeline"):
        for trl in trls:
            if ours in results:
                goal = "  (goal >= 2x)" if trl == best_trl else ""
                print(f"  {ours} / {trl}: {rate(ours) / rate(trl):.2f}x{goal}")
    for ours in ("single", "pipeline"):
        if ours in results and f"{ours}_nocache" in results:
            r_on, r_off = results[ours], results[f"{ours}_nocache"]
            print(
                f"  {ours}: cache on / off: {rate(ours) / rate(ours + '_nocache'):.2f}x "
                f"({r_off['seconds']:.1f}s -> {r_on['seconds']:.1f}s)"
            )
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
