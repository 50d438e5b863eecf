"""Every write of the pipeline into a run folder: text, JSON, record splits and model folders are replaced
atomically (a crash leaves the old file or the new one, never half of one); evaluations and curves go through
here too, so one module decides who writes: under several processes (``accelerate launch``, torchrun) only
rank 0 writes, and every function here does nothing on the other ranks (they keep the same state in memory).

What is written elsewhere: the training functions' epoch checkpoints (``checkpoints/``) and the single reward
models (``baseline*/``, :func:`dmoerm.training.single.train_reward_model`), the judge's labels and cache
(``labels/``, :func:`dmoerm.labelling.pipeline.label_pairs`) and the tracker's logs (:mod:`dmoerm.tracking`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from dmoerm.training.distributed import is_main_process


def _replace(path: Path, write) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place (rank 0 alone)."""
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> Path:
    """``obj`` as indented JSON (the run folder's ``state.json``, ``sizes.json``, the scaling summary)."""
    return write_text(path, json.dumps(obj, indent=2))


def save_records(records: Iterable, path: Path) -> None:
    """Preference records in the user JSONL schema (:func:`dmoerm.data.save_jsonl`), atomically."""
    from dmoerm.data import save_jsonl

    _replace(path, lambda tmp: save_jsonl(records, tmp))


def save_model(model, directory: Path) -> None:
    """``model.save_pretrained`` into ``directory``, swapped in whole: written beside it, then renamed."""
    if not is_main_process():
        return
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def copy_folder(source: Path, target: Path) -> None:
    """A copy of a finished folder (a reused single reward model) under ``target``."""
    if not is_main_process():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)


def write_eval(result, folder: Path) -> None:
    """``eval.json`` and ``eval.md`` of one system (:func:`dmoerm.evaluation.write_eval`)."""
    if not is_main_process():
        return
    from dmoerm.evaluation import write_eval as write

    write(result, folder)


def save_curves(history: dict, path: Path, title: str) -> None:
    """A stage's loss and dev-agreement curves as a PNG (:func:`dmoerm.training.loop.save_curves`)."""
    if not is_main_process():
        return
    from dmoerm.training.loop import save_curves as save

    save(history, path, title)


def save_rng_state(path: Path, after: str) -> None:
    """The process's global RNG states after stage ``after`` (torch's CPU one, and the current GPU's where
    there is one), atomically: a resumed run restores them (:func:`dmoerm.pipeline.state.restore_rng_on_resume`)."""
    import torch

    state = {"after": after, "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    _replace(path, lambda tmp: torch.save(state, tmp))


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG."""
    if not is_main_process():
        return
    fig.savefig(path, dpi=dpi)
