"""The resume state of a run folder: ``state.json`` (finished stages and the config fields each read), the
checks a rerun makes before any work, and what a lost or damaged run file means.

A rerun whose config changed a recorded stage's inputs stops with :class:`~dmoerm.config_check.RunStopped`
naming the fields (or, with ``resume: restart``, trains those stages and every stage after them again); a
deleted ``model/`` makes its stages unfinished; damaged files name themselves and the way out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dmoerm.config_check import RunStopped
from dmoerm.pipeline.files import write_json
from dmoerm.reward_model import MODEL_FILE

logger = logging.getLogger(__name__)


class StageState:
    """Finished stages, persisted atomically in state.json, with the inputs (config fields) of each.

    A stage's inputs are recorded when it starts (its first ``stage not in stages`` test) and kept when it
    finishes. With ``config``, opening the state checks every recorded stage against the config: a changed
    input stops the run (:class:`RunStopped` naming the fields, old -> new, and the way out) before anything
    is trained or rewritten.
    """

    def __init__(self, path: Path, config=None):
        """``config``: the run's :class:`~dmoerm.pipeline.config.PipelineConfig`; None only reads the state."""
        self.path, self.config = path, config
        self.on_first_start = None
        """Called once, when a stage first starts in this process (:func:`restore_rng_on_resume`)."""
        self.done: dict[str, dict] = _read_state(path)
        self.inputs: dict[str, dict] = self.done.pop(_INPUTS, {})
        if config is not None:
            unchecked = [s for s in self.done if s not in self.inputs and stage_inputs(config, s)]
            if unchecked:
                logger.warning(
                    "%s records no inputs for %s (an older run): resumed without checking them",
                    path,
                    ", ".join(unchecked),
                )
            self._check_inputs()

    def __contains__(self, stage: str) -> bool:
        if stage in self.done:
            return True
        if self.on_first_start is not None:
            start, self.on_first_start = self.on_first_start, None
            start()
        if self.config is not None and stage not in self.inputs:  # about to start: record what it reads
            self.inputs[stage] = stage_inputs(self.config, stage)
            self._write()
        return False

    def finish(self, stage: str, info: dict | None = None) -> None:
        self.done[stage] = info or {}
        if self.config is not None and not stage.startswith("_") and stage != "eval":
            self.inputs[stage] = stage_inputs(self.config, stage)
        self._write()

    def forget(self, stages: Sequence[str]) -> None:
        """Mark ``stages`` not finished (their outputs are gone)."""
        for stage in stages:
            self.done.pop(stage, None)
        self._write()

    def _write(self) -> None:
        write_json(self.path, {**self.done, _INPUTS: self.inputs})

    def _check_inputs(self) -> None:
        changed = [s for s, old in self.inputs.items() if stage_inputs(self.config, s) != _recorded(old)]
        if changed and self.config.resume == "restart":
            self._restart(changed)
            return
        for stage in changed:
            old, new = _recorded(self.inputs[stage]), stage_inputs(self.config, stage)
            changed = [
                f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k, _MISSING) != new.get(k, _MISSING)
            ]
            how = "finished" if stage in self.done else "started (its checkpoint holds them)"
            raise RunStopped(
                f"{self.path.parent}: stage {stage} {how} with other inputs than this config gives: "
                f"{'; '.join(changed)}. Resuming would mix the two (and config.yaml would misdescribe the model). "
                "Use a new --output-dir (or delete this one) to train with the new config, rerun with "
                "--restart-changed (resume: restart) to train this stage and every stage after it again, or set "
                "the old values back to resume."
            )

    def _restart(self, changed: Sequence[str]) -> None:
        """Forget the changed stages and delete what they wrote; when an expert's training changed, the model
        folder goes too (its other stages then retrain from their final epoch checkpoints: same weights)."""
        out = self.path.parent
        logger.warning("resume=restart: inputs changed for %s: training them again", ", ".join(changed))
        for stage in changed:
            for path in _stage_outputs(out, stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            self.inputs.pop(stage)
        self.forget(changed)
        if any(s.split("/", 1)[0] in ("phase1", "phase2") for s in changed):
            shutil.rmtree(out / "model", ignore_errors=True)


RNG_FILE = "rng_state.pt"
"""The global RNG states after the last recorded stage (:func:`dmoerm.pipeline.files.save_rng_state`)."""


def restore_rng_on_resume(stages: StageState) -> None:
    """Make a resumed run draw what the straight run drew: the first stage that starts in this process starts
    from the global RNG states saved after the last recorded stage (a new expert's LoRA and value head are
    drawn from them before its training seeds anything; a new process's RNG is seeded at random). Every rank
    restores rank 0's states. Nothing is restored when the file is missing or was saved after a stage that
    is not recorded finished (a kill between the two writes), nor on a fresh run."""
    import torch

    path = stages.path.with_name(RNG_FILE)
    if not path.exists():
        return
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # only reproducibility is lost: the run goes on
        logger.warning("%s: unreadable (%s); the resumed stages draw fresh random initialisations", path, e)
        return
    if saved.get("after") not in stages.done:
        return

    def restore() -> None:
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
        logger.info("resumed the global RNG states saved after stage %s", saved["after"])

    stages.on_first_start = restore


def checkpoint_dir(out: Path, *stage: str) -> Path:
    """Where a training stage keeps its epoch checkpoints: ``("phase2", "code", "correctness")`` ->
    ``checkpoints/phase2_code_correctness``."""
    return out / "checkpoints" / "_".join(stage)


def label_file(out: Path, category: str) -> Path:
    """The judge's capability labels of a category's records (stage ``labels/<category>``)."""
    return out / "labels" / f"{category}.jsonl"


def _stage_outputs(out: Path, stage: str) -> list[Path]:
    """What stage ``stage`` writes besides the model folder (the paths the stages of
    :mod:`dmoerm.pipeline.stages` give it)."""
    parts = stage.split("/")
    if parts[0] == "phase1":
        return [checkpoint_dir(out, "phase1", parts[1])]
    if parts[0] == "phase2":
        return [checkpoint_dir(out, "phase2", parts[1], parts[2])]
    if parts[0] == "labels":
        return [label_file(out, parts[1])]
    if parts[0].startswith("baseline"):
        return [out / parts[0]]
    return []


_INPUTS = "_inputs"
"""Key of state.json holding each recorded stage's inputs."""
_MISSING = object()
_ROUTER_DATA = ("router_sources", "router_dev_sources", "router_prompts", "router_dev_prompts")
_STAGE_SECTIONS = {
    "router": ("router",),
    "phase1": ("phase1",),
    "labels": ("labels",),
    "phase2": ("phase1", "labels", "phase2"),
    "phase3": ("phase1", "labels", "phase2", "phase3"),
    "likelihood": ("phase1", "labels", "phase2", "phase3", "likelihood"),
    "baseline": ("phase1",),
    "warm_start": ("phase1",),
}
"""The config sections each kind of stage reads beside ``data`` and ``model`` (those of the stages it starts
from included, so a change upstream names its field at every stage after it)."""
_NOT_INPUTS = {"labels.max_failed_share"} | {
    f"labels.judge.{k}"
    for k in (
        "progress",
        "concurrency",
        "base_url",
        "timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_max_s",
        "requests_per_second",
        "price_prompt_per_m",
        "price_completion_per_m",
        "batch_size",
        "device",
    )
}
"""Fields that change how a stage runs, not what it produces (a judge that moved to another URL after an
outage may finish a started labelling stage)."""


_ADDED_LATER = {
    "data.test_share": 0.1,
    "data.dev_share": 0.1,
    "phase3.gate_alpha": 1.0,
    "specialise.replay": 0.0,
    "specialise.learning_rate": None,
    "specialise.shared_expert": False,
    "specialise.gate_alpha": 1.0,
    "specialise.gate_share": 0.0,
    "specialise.gate_cross_fit": False,
    "phase1.length_covariate": 0.0,
    "phase2.length_covariate": 0.0,
    "phase3.length_covariate": 0.0,
}
"""Fields added after runs were recorded, at the value that does what those runs did: left out of a stage's
inputs at that value (computed or recorded), so such a run folder resumes, while any other value is a changed
input."""


def _recorded(inputs: dict) -> dict:
    """A stage's recorded inputs as :func:`stage_inputs` gives them now (:data:`_ADDED_LATER` at their old
    value left out: a folder recorded while one of them was written down at that value also resumes)."""
    return {k: v for k, v in inputs.items() if _ADDED_LATER.get(k, _MISSING) != v}


def stage_inputs(config, stage: str) -> dict:
    """The config fields stage ``stage`` (``phase2/code/correctness``) depends on, flattened: ``{"phase1.epochs":
    3, ...}``. Every stage reads the ``data`` and ``model`` sections; ``eval`` reruns each time (none)."""
    kind = stage.split("/", 1)[0]
    kind = "baseline" if kind.startswith("baseline") else kind
    if kind not in _STAGE_SECTIONS:
        return {}
    data = asdict(config.data)
    if kind != "router":
        data = {k: v for k, v in data.items() if k not in _ROUTER_DATA}
    sections = {"data": data, "model": asdict(config.model), "without_router": config.without_router}
    for name in _STAGE_SECTIONS[kind]:
        sections[name] = asdict(getattr(config, name))
    if kind in ("phase1", "phase2", "phase3", "likelihood"):  # where each inner model starts (issue 13)
        sections["warm_start"] = config.warm_start
        specialise = asdict(config.specialise)
        if kind in ("phase1", "phase2"):  # the shared expert changes phase 3 (and what follows) only
            specialise.pop("shared_expert")
        sections["specialise"] = specialise
    if stage.startswith("baseline_seed"):
        sections["phase1"]["seed"] += int(stage[len("baseline_seed") :])
    flat = {k: v for k, v in _flatten(sections).items() if _ADDED_LATER.get(k, _MISSING) != v}
    files = list(enumerate(config.data.sources))
    if (
        kind in ("labels", "phase2", "phase3", "likelihood")
        and config.labels.source == "file"
        and config.labels.file
    ):
        files.append(("labels.file", config.labels.file))
    for where, name in files:  # a data file edited in place is a changed input too
        digest = _file_digest(Path(name))
        if digest is not None:
            flat[f"data.sources[{where}] sha256" if where != "labels.file" else "labels.file sha256"] = digest
    return {k: v for k, v in flat.items() if k not in _NOT_INPUTS}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str | None:
    """sha256 of a local file (cached by path, size and modification time); None for a bundled source name."""
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def hide_library_bars() -> None:
    """Turn off the progress bars of Hugging Face libraries in this process (loading weights, downloads):
    ``progress=False`` means no bar at all, not only ours."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def forget_lost_model_stages(stages: StageState, model_dir: Path) -> None:
    """Stages whose weights live in ``model_dir`` are not finished when it is gone: they train again (from
    their last epoch checkpoint where one is left)."""
    if (model_dir / MODEL_FILE).exists():
        return
    lost = [
        s for s in stages.done if s.split("/", 1)[0] in ("router", "phase1", "phase2", "phase3", "likelihood")
    ]
    if lost:
        logger.warning(
            "%s is missing but %s records %d finished stages in it (%s): training them again",
            model_dir,
            stages.path,
            len(lost),
            ", ".join(lost),
        )
        stages.forget(lost)


def load_run_model(model_dir: Path):
    """The run's DMoERM from ``model_dir``; a damaged folder stops the run naming the files that do not parse."""
    from dmoerm.model import DMoERM

    try:
        return DMoERM.from_pretrained(model_dir)
    except Exception as e:  # safetensors, JSON, PEFT and missing-file errors alike
        damaged = _damaged_files(model_dir)
        which = f"damaged: {', '.join(str(p) for p in damaged)}; " if damaged else ""
        raise RunStopped(
            f"{model_dir}: the run's model folder cannot be loaded ({which}{type(e).__name__}: {e}). Delete "
            f"{model_dir} to train its stages again (labels and epoch checkpoints are kept)."
        ) from None


def _damaged_files(folder: Path) -> list[Path]:
    """The safetensors and JSON files under ``folder`` that do not parse."""
    from safetensors import safe_open

    bad = []
    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception:
            bad.append(path)
    return bad


def _read_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    except (ValueError, UnicodeDecodeError) as e:
        raise RunStopped(
            f"{path}: damaged ({e}); it records which stages of this run are finished. Delete the run folder "
            f"{path.parent} (or state.json and model/ in it) to train again from scratch."
        ) from None
    return state
