"""A training run's resume state: one safetensors file, tensors in it and everything else as JSON in its
metadata (no pickle: a run folder from someone else cannot execute code)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT_FILE = "checkpoint.safetensors"
"""Name of the checkpoint file inside a run's checkpoint folder."""
_META = "dmoerm_checkpoint"


@dataclass
class ResumeState:
    """Where a run stands after an epoch, besides its weights, optimizer and scheduler."""

    epoch: int = 0
    """Epochs finished."""
    result: dict = field(default_factory=dict)
    """The run's :class:`~dmoerm.training.loop.TrainResult` so far, as a dict."""
    best: list[torch.Tensor] | None = None
    """The trainable weights with the best dev agreement so far (None before the first evaluation)."""
    bad_evals: int = 0
    """Dev evaluations since the best one (early stopping's count)."""


class Checkpoint:
    """The file ``<directory>/checkpoint.safetensors``: written atomically after each epoch (a kill leaves the
    previous epoch's intact), read back on a rerun."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / CHECKPOINT_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, weights, optimizer, scheduler, state: ResumeState) -> None:
        """Write ``weights`` (whole tensors: see :func:`dmoerm.training.loop.full_weights`), the optimizer,
        scheduler, both RNGs and ``state``."""
        from safetensors.torch import save_file

        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(weights)}
        if state.best is not None:
            tensors.update({f"best.{i}": p.detach().cpu().contiguous() for i, p in enumerate(state.best)})
        opt = optimizer.state_dict()
        opt_state: dict[str, dict] = {}
        for idx, entry in opt["state"].items():
            opt_state[str(idx)] = {}
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
                else:
                    opt_state[str(idx)][name] = value
        tensors["rng.torch"] = torch.get_rng_state()
        version, internal, gauss = random.getstate()
        meta = {
            "epoch": state.epoch,
            "result": state.result,
            "bad_evals": state.bad_evals,
            "has_best": state.best is not None,
            "optimizer": {"state": opt_state, "param_groups": opt["param_groups"]},
            "scheduler": scheduler.state_dict(),
            "rng_python": [version, list(internal), gauss],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
        os.replace(tmp, self.path)

    def load(self, params, optimizer, scheduler) -> ResumeState:
        """Restore ``params``, the optimizer, scheduler and RNGs; the rest of the state. A damaged file raises
        ``ValueError`` naming it and what to do."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            n = len(params)
            loaded = [tensors[f"param.{i}"] for i in range(n)]
            if f"param.{n}" in tensors or any(a.shape != b.shape for a, b in zip(loaded, params)):
                raise ValueError("its parameters do not match this expert's (another model or LoRA rank?)")
            best = [tensors[f"best.{i}"] for i in range(n)] if meta["has_best"] else None
            state = {}
            for idx, rest in meta["optimizer"]["state"].items():
                entry = dict(rest)
                prefix = f"optim.{idx}."
                entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
                state[int(idx)] = entry
            with torch.no_grad():
                for p, v in zip(params, loaded, strict=True):
                    p.copy_(v.to(p.device, p.dtype))
            optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
            scheduler.load_state_dict(meta["scheduler"])
            version, internal, gauss = meta["rng_python"]
            random.setstate((version, tuple(internal), gauss))
            torch.set_rng_state(tensors["rng.torch"])
            return ResumeState(meta["epoch"], meta["result"], best, meta["bad_evals"])
        except Exception as e:  # safetensors raises its own errors for a cut or garbled file
            raise ValueError(
                f"{self.path}: cannot resume from this training checkpoint ({type(e).__name__}: {e}); delete it "
                "to train this stage again from its first epoch"
            ) from None
