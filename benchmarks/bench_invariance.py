"""Batch invariance and its cost, side by side (issue 14 item 1), and the on-disk trunk cache (issue 13).

One run, on the real default backbone (SmolLM2-135M-Instruct) and real chats (both responses of the first
``--chats / 2`` bundled ``rmb/pairwise`` records, ``--max-length`` tokens), with one random LoRA adapter and value
head (seeded; the same weights in every variant). Trunk variants:

- ``batched bf16``: one decoder call per length-bucketed, right-padded batch (the trunk before the fix,
  ``SplitBackbone.trunk_batched``).
- ``per-row bf16``: each distinct row alone, unpadded (``SplitBackbone.trunk`` now).
- ``equal-length bf16``: rows grouped only when their lengths are equal (no padding, but batches of several).
- ``fixed-shape bf16``: shape-stable buckets: every call is ``--batch-size`` rows of ``--max-length`` tokens
  (rows right-padded to the limit, the batch filled with one-token dummy rows), so every kernel always sees one
  shape.
- ``batched fp32`` / ``per-row fp32``: the same with a float32 trunk.

Times are CPU seconds of the process (``time.process_time``, one torch thread), robust to a shared machine.
For each: trunk throughput (real tokens/s, median of ``--rounds`` interleaved rounds), the largest reward
difference of a chat scored alone versus inside mixed batches (``--probes`` chats, each beside longer and shorter
ones and beside chats of its own length), and the CPU time of scoring one chat alone (a lone request). The top
layers (float32) and value head are the same in every variant; ``top layer only`` feeds one set of per-row states
alone and padded to the top, which isolates the float32 top layer's own batch dependence. Then the scoring
cost with the per-row trunk versus the batched one, for the single RM and DMoERM (``bench_scoring.py``'s models:
``code``, K = 5 experts), and a second pass with a warm on-disk trunk cache versus a cold one.

    .venv/bin/python benchmarks/bench_invariance.py                  # 64 chats, 256 tokens, 3 rounds
    .venv/bin/python benchmarks/bench_invariance.py --chats 16 --rounds 1 --no-scoring   # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _clock() -> float:
    """CPU seconds of this process: on a shared machine (load 6-7 on 2 cores here) wall time mostly measures the
    other processes; with one torch thread the process's CPU time is the work itself."""
    return time.process_time()


VARIANTS = (
    "batched bf16",
    "per-row bf16",
    "equal-length bf16",
    "fixed-shape bf16",
    "batched fp32",
    "per-row fp32",
)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="default", help="backbone folder or hub id (default: bundled)")
    ap.add_argument("--source", default="rmb/pairwise", help="bundled preference source (dmoerm.data)")
    ap.add_argument("--chats", type=int, default=64, help="chats timed (both responses of chats/2 records)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=1, help="top layers with LoRA (the main job's 1)")
    ap.add_argument("--probes", type=int, default=6, help="chats checked alone versus in mixed batches")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see RESULTS.md)")
    ap.add_argument("--scoring-records", type=int, default=8, help="bench_scoring records (2 inputs each)")
    ap.add_argument("--no-scoring", action="store_true", help="skip the single RM / DMoERM scoring cost")
    return ap.parse_args(argv)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "lscpu not available"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs; flags {' '.join(wanted)}"


def _bank(args, trunk_dtype: str):
    import torch

    from dmoerm.experts import BackboneConfig, ExpertBank

    torch.manual_seed(0)  # the same LoRA and head weights in both banks
    config = BackboneConfig(
        backbone=args.backbone,
        num_top_layers=args.top_layers,
        trunk_dtype=trunk_dtype,
        max_length=args.max_length,
    )
    bank = ExpertBank(config, init_lora_weights=False)
    bank.add_expert("reward")
    bank.eval()
    return bank


def _chats(args, tokenizer):
    from dmoerm.data import load_data
    from dmoerm.encoding import encode_record

    records = list(load_data(args.source, limit=max(1, (args.chats + 1) // 2)))
    items = [encode_record(tokenizer, r, args.max_length) for r in records]
    return [e for item in items for e in item.inputs[:2]][: args.chats]


# ------------------------------------------------------------------------------------------------- trunks
def _equal_length(backbone, input_ids, attention_mask):
    """Rows grouped by exact length, each group one unpadded decoder call: [B, T] -> [B, T, H]."""
    import torch

    lengths = attention_mask.sum(1).tolist()
    out = None
    for n in sorted(set(lengths)):
        rows = [i for i, m in enumerate(lengths) if m == n]
        ids = input_ids[rows, :n]  # right-padded batches: the real tokens come first
        states = backbone.trunk_batched(ids, torch.ones_like(ids))  # [G, n, H]
        if out is None:
            out = states.new_zeros((*input_ids.shape, states.shape[-1]))
        out[rows, :n] = states
    return out


def _fixed_shape(backbone, input_ids, attention_mask, rows: int, width: int):
    """Calls of exactly [rows, width]: [B, T] -> [B, T, H] (T <= width)."""
    import torch

    b, t = input_ids.shape
    out = []
    for start in range(0, b, rows):
        ids = input_ids.new_zeros((rows, width))
        mask = attention_mask.new_zeros((rows, width))
        mask[:, 0] = 1  # dummy rows: one token, so no row is fully masked
        chunk = slice(start, min(start + rows, b))
        n = chunk.stop - chunk.start
        ids[:n, :t], mask[:n, :t] = input_ids[chunk], attention_mask[chunk]
        out.append(backbone.trunk_batched(ids, mask)[:n, :t])
    return torch.cat(out)


def _trunk_fn(banks, variant: str, args):
    bank = banks["fp32" if variant.endswith("fp32") else "bf16"]
    backbone = bank.backbone
    if variant.startswith("batched"):
        return bank, backbone.trunk_batched
    if variant.startswith("per-row"):
        return bank, backbone.trunk
    if variant.startswith("fixed-shape"):
        return bank, lambda ids, mask: _fixed_shape(backbone, ids, mask, args.batch_size, args.max_length)
    return bank, lambda ids, mask: _equal_length(backbone, ids, mask)


def _trunk_pass(banks, variant, inputs, args):
    import torch

    from dmoerm.encoding import collate, length_buckets

    bank, trunk = _trunk_fn(banks, variant, args)
    with torch.no_grad():
        for idx in length_buckets([len(e.input_ids) for e in inputs], args.batch_size):
            batch = collate([inputs[i] for i in idx], bank.tokenizer.pad_token_id)
            trunk(batch["input_ids"], batch["attention_mask"])


def _rewards(banks, variant, batch, args):
    """Rewards [B] of one batch of encoded inputs, trunk by ``variant``, the shared float32 top and head."""
    import torch

    from dmoerm.encoding import collate

    bank, trunk = _trunk_fn(banks, variant, args)
    b = collate(batch, bank.tokenizer.pad_token_id)
    with torch.no_grad():
        states = trunk(b["input_ids"], b["attention_mask"])
        return bank(states, b["attention_mask"], "reward").float()


def _probe_batches(inputs, probes: int):
    """(probe, batches containing it): chats of spread lengths, each beside longer and shorter chats and beside
    chats of exactly its own length where there are any."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i].input_ids))
    picks = [order[round(k * (len(order) - 1) / max(1, probes - 1))] for k in range(probes)]
    out = []
    for p in picks:
        n = len(inputs[p].input_ids)
        longer = [i for i in order if len(inputs[i].input_ids) > n][-2:]
        shorter = [i for i in order if len(inputs[i].input_ids) < n][:2]
        same = [i for i in order if len(inputs[i].input_ids) == n and i != p][:3]
        mixed = [inputs[i] for i in shorter + longer]
        batches = [
            [inputs[p], *mixed],
            [*mixed[::-1], inputs[p]],
            [inputs[i] for i in same] + [inputs[p], *mixed],
        ]
        out.append((inputs[p], batches))
    return out


def _max_difference(banks, variant, probe_batches, args) -> tuple[float, float]:
    """(largest |reward alone - reward in a batch|, median CPU s of scoring one probe alone)."""
    worst, lone = 0.0, []
    for probe, batches in probe_batches:
        t = _clock()
        alone = float(_rewards(banks, variant, [probe], args)[0])
        lone.append(_clock() - t)
        for batch in batches:
            together = float(_rewards(banks, variant, batch, args)[batch.index(probe)])
            worst = max(worst, abs(together - alone))
    return worst, statistics.median(lone)


def _top_only_difference(bank, probe_batches) -> float:
    """The float32 top layer alone: the same per-row trunk states scored alone and padded into mixed batches."""
    import torch

    from dmoerm.training.trunk_cache import TrunkCache, pad_states

    cache = TrunkCache()
    worst = 0.0
    with torch.no_grad():
        for probe, batches in probe_batches:
            alone = float(bank(*pad_states(cache.get(bank, [probe])), "reward")[0])
            for batch in batches:
                rewards = bank(*pad_states(cache.get(bank, batch)), "reward")
                worst = max(worst, abs(float(rewards[batch.index(probe)]) - alone))
    return worst


# ------------------------------------------------------------------------------------------------- parts
def _trunk_section(args, banks, inputs):
    tokens = sum(len(e.input_ids) for e in inputs)
    for variant in VARIANTS:  # warm-up
        _trunk_pass(banks, variant, inputs[:2], args)
    times = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            t = _clock()
            _trunk_pass(banks, variant, inputs, args)
            times[variant].append(_clock() - t)
        print(f"round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.1f}s" for v in VARIANTS), flush=True)
    probe_batches = _probe_batches(inputs, args.probes)
    diffs, lone = {}, {}
    for v in VARIANTS:
        diffs[v], lone[v] = _max_difference(banks, v, probe_batches, args)
    top_only = _top_only_difference(banks["bf16"], probe_batches)
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    base = med["batched bf16"]
    checks = sum(len(b) for _, b in probe_batches)
    print(f"\ntrunk over {len(inputs)} chats ({tokens} tokens); reward alone vs {checks} mixed batches:")
    print(
        f"{'variant':<18} {'median cpu s':>12} {'tokens/s':>9} {'time / batched bf16':>20} {'max |reward diff|':>18}"
        f" {'one chat alone, s':>18}"
    )
    for v in VARIANTS:
        print(
            f"{v:<18} {med[v]:>12.2f} {tokens / med[v]:>9.0f} {med[v] / base:>19.2f}x {diffs[v]:>18.2e}"
            f" {lone[v]:>18.3f}"
        )
    print(
        f"{'top layer only':<18} {'':>12} {'':>9} {'':>20} {top_only:>18.2e}   (fp32 top on per-row states)"
    )


def _scoring_section(args):
    """DMoERM / single RM scoring with the per-row trunk and with the batched one (bench_scoring's models)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_scoring as bs

    sargs = bs._args(
        [
            "--records",
            str(args.scoring_records),
            "--top-layers",
            str(args.top_layers),
            "--max-length",
            str(args.max_length),
            "--no-naive",
            "--no-memory",
        ]
    )
    dmoerm, inputs = bs._build(sargs, "dmoerm")
    single = bs._build(sargs, "single")[0]
    models = {"single": single, "dmoerm": dmoerm}
    runs = [(m, t) for t in ("per-row", "batched") for m in ("single", "dmoerm")]

    def run(model_name, trunk):
        bank = models[model_name].bank
        if trunk == "batched":
            bank.backbone.trunk = bank.backbone.trunk_batched  # instance attribute: the old behaviour
        try:
            return bs._run(model_name, models[model_name], inputs, sargs.batch_size)
        finally:
            bank.backbone.__dict__.pop("trunk", None)

    for m, t in runs:
        run(m, t)  # warm-up
    times = {k: [] for k in runs}
    rewards = {}
    for r in range(args.rounds):
        for k in runs[r % len(runs) :] + runs[: r % len(runs)]:
            t = _clock()
            rewards[k] = run(*k)
            times[k].append(_clock() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(e.input_ids) for e in inputs)
    print(f"\nscoring {len(inputs)} inputs ({tokens} tokens) of code, K=5, batch {sargs.batch_size}:")
    for m in ("single", "dmoerm"):
        print(
            f"{m:<7} per-row {med[(m, 'per-row')]:.2f}s, batched {med[(m, 'batched')]:.2f}s: "
            f"per-row / batched {med[(m, 'per-row')] / med[(m, 'batched')]:.2f}x"
        )
    for t in ("per-row", "batched"):
        print(
            f"DMoERM / single RM, {t} trunk: {med[('dmoerm', t)] / med[('single', t)]:.2f}x   (goal <= 1.3x)"
        )
    moved = max(float((rewards[(m, "per-row")] - rewards[(m, "batched")]).abs().max()) for m in models)
    print(
        f"largest reward change per-row vs batched trunk (same inputs, batch {sargs.batch_size}): {moved:.2e}"
    )


def _disk_section(args, bank, inputs):
    import torch

    from dmoerm.training.trunk_cache import TrunkCache

    with tempfile.TemporaryDirectory(prefix="trunk-cache-") as folder:
        t = _clock()
        cold = TrunkCache(directory=folder).get(bank, inputs, args.batch_size)
        t_cold = _clock() - t
        t = _clock()
        warm_cache = TrunkCache(directory=folder)
        warm = warm_cache.get(bank, inputs, args.batch_size)
        t_warm = _clock() - t
        size = sum(p.stat().st_size for p in Path(folder).iterdir()) / 2**20
        same = all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    print(
        f"\ndisk trunk cache, {len(inputs)} chats: cold {t_cold:.2f}s (compute + write), warm {t_warm:.3f}s "
        f"(read, new process-like cache; {warm_cache.disk_hits} disk hits): cold / warm {t_cold / t_warm:.0f}x; "
        f"{size:.1f} MiB on disk; exact tensors: {same}"
    )


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"CPU: {_cpu()}; torch {torch.__version__}, {args.threads} thread(s)")
    banks = {"bf16": _bank(args, "bfloat16"), "fp32": _bank(args, "float32")}
    inputs = _chats(args, banks["bf16"].tokenizer)
    print(
        f"backbone {args.backbone}: {banks['bf16'].backbone.num_layers} layers ({args.top_layers} on top), "
        f"{len(inputs)} chats of {args.source}, max {args.max_length} tokens, batch {args.batch_size}"
    )
    _trunk_section(args, banks, inputs)
    _disk_section(args, banks["bf16"], inputs)
    if not args.no_scoring:
        del banks
        _scoring_section(args)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
