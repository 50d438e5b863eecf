"""Write RMB best-of-n lists whose prompt a training run did not use (its phase-1, phase-3 and dev splits).

    .venv/bin/python examples/heldout_bon.py runs/main-timing3 --per-set 40
    dmoerm eval --model runs/main-timing3/model --data runs/main-timing3/bon_heldout.jsonl --taxonomy default \\
        --out runs/main-timing3/bon/DMoERM
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dmoerm.data import load_data, save_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="output_dir of a `dmoerm train` run (reads its splits/*.jsonl)")
    ap.add_argument(
        "--per-set", type=int, default=40, help="lists kept per RMB best-of-n set (the first ones)"
    )
    ap.add_argument("--out", help="output JSONL (default RUN/bon_heldout.jsonl)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = Path(args.run)
    used = {
        r.prompt_key
        for name in ("phase1", "phase3", "dev")
        for r in load_data(str(run / "splits" / f"{name}.jsonl"))
    }
    kept = []
    for source in ("rmb/bon_helpfulness", "rmb/bon_harmlessness"):
        kept += [r for r in load_data(source) if r.prompt_key not in used][: args.per_set]
    out = Path(args.out or run / "bon_heldout.jsonl")
    save_jsonl(kept, out)
    logging.info("%s: %d lists, %d responses", out, len(kept), sum(len(r.responses) for r in kept))


if __name__ == "__main__":
    main()
