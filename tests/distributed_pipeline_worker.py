"""``dmoerm`` (its CLI's ``main``) as one process of a ``torch.distributed.run`` launch, for the pipeline's
2-process tests: ``python -m torch.distributed.run --nproc_per_node 2 distributed_pipeline_worker.py train ...``.

Two test-only additions, set by environment variables:
- ``DMOERM_TEST_GUARD=<folder>``: on every rank but 0, any write, rename, delete or SQLite open under the
  folder raises and prints ``RANK-WRITE`` to stderr (the test fails on it): rank 0 alone writes the run folder.
- ``DMOERM_TEST_KILL_AFTER=<stage>``: once every rank recorded the stage (rank 0 wrote state.json), rank 1
  exits at once (``os._exit``, like a killed process); the launcher then ends rank 0 mid-run.
- ``DMOERM_TEST_FSDP=<accelerate config file>``: the accelerator's state switched to that file's FSDP settings
  (accelerate on the CPU falls back to DDP: tests/fsdp_worker.py) before the command runs; at exit each rank
  prints ``FSDP-UNITS rank <r>: <n> sharded <m>``: n training views prepared by FSDP2, m of them with every
  trained weight a DTensor shard.
"""

import builtins
import io
import os
import sqlite3
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def _guard(folder: str) -> None:
    root = Path(folder).resolve()

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        p = Path(os.fsdecode(path)).resolve()
        return p == root or root in p.parents

    def refuse(what: str, path) -> None:
        sys.stderr.write(f"RANK-WRITE rank {RANK} {what} {path}\n")
        raise PermissionError(f"rank {RANK} may not write {path}")

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse("open", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_
    for name in ("replace", "rename", "mkdir", "makedirs", "remove", "unlink", "rmdir"):
        real = getattr(os, name)

        def changed(path, *args, _real=real, _name=name, **kwargs):
            if inside(path):
                refuse(_name, path)
            return _real(path, *args, **kwargs)

        setattr(os, name, changed)
    real_connect = sqlite3.connect

    def connect(database, *args, **kwargs):
        if inside(database):
            refuse("sqlite3.connect", database)
        return real_connect(database, *args, **kwargs)

    sqlite3.connect = connect


def _kill_after(stage_to_kill: str) -> None:
    from dmoerm.pipeline.stages import RunContext
    from dmoerm.training.distributed import wait_for_main

    record = RunContext.record

    def record_then_die(self, stage, *args, **kwargs):
        record(self, stage, *args, **kwargs)
        if stage == stage_to_kill:
            wait_for_main()  # rank 0 has written state.json with the stage finished
            if RANK == 1:
                sys.stderr.write(f"KILLED rank 1 after {stage}\n")
                sys.stderr.flush()
                os._exit(3)

    RunContext.record = record_then_die


if __name__ == "__main__":
    if os.environ.get("DMOERM_TEST_GUARD") and RANK != 0:
        _guard(os.environ["DMOERM_TEST_GUARD"])
    if os.environ.get("DMOERM_TEST_KILL_AFTER"):
        _kill_after(os.environ["DMOERM_TEST_KILL_AFTER"])
    if os.environ.get("DMOERM_TEST_FSDP"):
        import atexit

        from dmoerm.training import loop
        from dmoerm.training.distributed import process_accelerator
        from fsdp_worker import PREPARED, RecordingShardedExpert, launch_env, switch_to

        switch_to(process_accelerator(), "fsdp", launch_env(os.environ["DMOERM_TEST_FSDP"]))
        loop.ShardedExpert = RecordingShardedExpert
        sharded = lambda: sum(u["fsdp_module"] and u["dtensors"] for u in PREPARED)  # noqa: E731
        atexit.register(
            lambda: sys.stderr.write(f"FSDP-UNITS rank {RANK}: {len(PREPARED)} sharded {sharded()}\n")
        )
    from dmoerm.cli import main

    sys.exit(main(sys.argv[1:]))
