"""Data parallelism with the same global batch as one process: every rank builds the same batches, takes a
contiguous share of each batch's items and normalises its loss by the whole batch, so the ranks' gradients add
up to the one-process gradient (DDP averages them, so a DDP loss is scaled by the world size).

Under one process every function here is the identity (no collective runs), so a one-process run computes
exactly what it computed before data parallelism existed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

_ACCELERATOR = None


def process_accelerator():
    """The process's one ``Accelerator``, built on first use.

    accelerate keeps one state per process, so a second ``Accelerator`` with other settings (phase 1 in bf16,
    phase 2 in float32) fails; every training run shares this one and sets its own gradient accumulation, and
    mixed precision is an autocast around each forward pass.
    """
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        if _deepspeed_on_cpu():
            from accelerate.state import PartialState

            # accelerate 1.15 finds no backend for DeepSpeed without a GPU and would run every rank as a
            # 1-process job (all of them rank 0, all writing): join the launch's processes over gloo instead.
            PartialState(cpu=False, backend="gloo")
            _ACCELERATOR = Accelerator(cpu=False)
        else:
            _ACCELERATOR = Accelerator(cpu=not torch.cuda.is_available())
        _load_backbones_whole(_ACCELERATOR)
    return _ACCELERATOR


def _load_backbones_whole(accelerator) -> None:
    """Under DeepSpeed with ``zero3_init_flag: false``, forget the config accelerate hands transformers anyway
    (accelerate 1.15 sets it whatever the flag), so ``from_pretrained`` loads each backbone whole: the expert
    bank stays whole on every rank, and ZeRO-3 partitions only an expert's trained weights, when its run
    starts (:class:`~dmoerm.training.sharding.ZeroThreeExpert`). A true flag is refused by ``check_sharding``."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and not plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _deepspeed_on_cpu() -> bool:
    """True in a process of ``accelerate launch`` with a DeepSpeed config on a machine without CUDA."""
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return launched and deepspeed and not torch.cuda.is_available()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes) under the process's accelerator; (0, 1) outside a
    distributed launch. Asking builds the accelerator, which joins the launch's process group."""
    accelerator = process_accelerator()
    return accelerator.process_index, accelerator.num_processes


def launched_world() -> int:
    """Processes of this launch by the launcher's ``WORLD_SIZE`` (torchrun and ``accelerate launch`` set it);
    1 outside a launch. Asking builds nothing, so a one-process command never starts the accelerator for it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 of a launch, and outside one: the process that writes run folders and caches."""
    return launched_world() == 1 or rank_and_world()[0] == 0


def wait_for_main() -> None:
    """A barrier of every rank (so the others read what rank 0 wrote); a no-op under one process."""
    if launched_world() > 1:
        process_accelerator().wait_for_everyone()


T = TypeVar("T")


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone, its result given to every rank (a barrier: the others wait). An
    exception on rank 0 is raised on every rank (rank 0's own with its traceback), so no rank waits for a
    partner that stopped. Under one process: ``compute()``. The result must pickle."""
    if launched_world() == 1:
        return compute()
    rank, _ = rank_and_world()
    payload: list = [None]
    error = None
    if rank == 0:
        try:
            payload[0] = (True, compute())
        except Exception as e:  # every rank stops alike
            error = e
            try:
                pickle.dumps(e)
                payload[0] = (False, e)
            except Exception:
                payload[0] = (False, RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def share(n: int, rank: int, world: int) -> range:
    """Positions of rank ``rank``'s contiguous share of ``n`` items (sizes differ by one at most; a rank may get
    none when ``n < world``). Shares in rank order concatenate to ``range(n)``."""
    return range(rank * n // world, (rank + 1) * n // world)


def gather_lists(local: Sequence) -> list:
    """Every rank's ``local`` list concatenated in rank order (the identity under one process).

    With :func:`share`-d inputs the result is in the global order. Tensors inside must be on the CPU."""
    _, world = rank_and_world()
    if world == 1:
        return list(local)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part]


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; the tensor itself under one process."""
    _, world = rank_and_world()
    if world == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def with_other_ranks(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The global batch's values [sum(counts)] with this rank's slice being ``local`` [counts[rank]] itself
    (graph kept) and the others' slices their (detached) values, so a loss over the whole batch (the length
    penalty's correlation) back-propagates into this rank's own rewards only; summed over ranks that is the
    one-process gradient. Returns ``local`` under one process."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    width = max(max(counts), 1)
    padded = local.detach().float().new_zeros(width)
    padded[: local.numel()] = local.detach().float()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces = [p[:c] for p, c in zip(parts, counts, strict=True)]
    pieces[rank] = local.float()
    return torch.cat(pieces)


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients of ``params`` over ranks, for small modules trained without DDP (router,
    aggregator) whose per-rank losses are already shares of the batch's loss. A parameter with no gradient
    (a rank with no item in the batch) joins with zeros. No-op under one process."""
    _, world = rank_and_world()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def computed_in_shares(compute, inputs: Sequence, device, dim: int = 0) -> torch.Tensor:
    """``compute(inputs)`` (a tensor with one row per input along ``dim``), each rank computing its share of
    the inputs (so only its trunk states) and the rows gathered on every rank, on ``device``. Under one process:
    ``compute(inputs)`` itself."""
    rank, world = rank_and_world()
    if world == 1:
        return compute(inputs)
    s = share(len(inputs), rank, world)
    part = compute(list(inputs)[s.start : s.stop]).cpu() if len(s) else None
    parts = [p for p in gather_lists([part]) if p is not None]
    return torch.cat(parts, dim=dim).to(device)
