"""Experiment tracking of a training run: TensorBoard or Weights & Biases through accelerate's trackers.

``PipelineConfig.report_to`` picks the backend (``none``, the default, imports nothing). The pipeline calls
:meth:`Tracker.log_stage` as each stage finishes; the stage's training history becomes curves named after the
stage, its summary numbers scalars beside them:

* ``router/loss`` (per step), ``router/accuracy``, ``router/per_category/<category>/accuracy``;
* ``phase1/<category>/loss``, ``phase1/<category>/dev_agreement`` (per dev evaluation),
  ``phase1/<category>/best_dev_agreement``; the same for ``phase3/<category>`` and ``baseline``;
* ``labels/<category>/<count>`` (the judge's label counts), ``phase2/<category>/<capability>/loss`` and
  ``.../labels`` (labels the expert trained on);
* ``eval/<system>/agreement`` and ``eval/router_test_accuracy`` once the test set is scored.

TensorBoard event files go to ``<output_dir>/tensorboard/<run name>/`` (``tensorboard --logdir
<output_dir>/tensorboard``). W&B runs go to ``<output_dir>/wandb/``, project ``$WANDB_PROJECT`` (default
``dmoerm``); ``WANDB_MODE=offline`` works without a network (``wandb sync`` uploads later). Each stage has its
own step axis (``<stage>/step`` in W&B), so a resumed run adds the stages it trains without clashing steps.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb")
"""The values of ``PipelineConfig.report_to``."""

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(value: Any) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``value`` is one of :data:`REPORT_TO`."""
    if value not in REPORT_TO:
        raise ValueError(f"report_to: {value!r} is not one of {', '.join(REPORT_TO)}")


def _scalars(obj: Any, prefix: str) -> dict[str, float]:
    """The numbers in a (nested) stage summary, named ``prefix/key/subkey``; text, lists and booleans left out."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_scalars(v, f"{prefix}/{k}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


class Tracker:
    """One run's tracker; ``report_to="none"`` makes every call a no-op."""

    def __init__(
        self, report_to: str = "none", run_dir: str | Path = ".", *, config: Mapping | None = None
    ) -> None:
        check_report_to(report_to)
        self.report_to = report_to
        self._backend = None
        self._defined: set[str] = set()  # W&B stages whose step axis is declared
        if report_to == "none":
            return
        package = _PACKAGES[report_to]
        if importlib.util.find_spec(package) is None:
            raise ValueError(
                f"report_to: {report_to} needs the {package} package: pip install 'dmoerm[track]' "
                f"(or set report_to: none)"
            )
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        PartialState()  # accelerate's trackers log through its state
        run_dir = Path(run_dir)
        name = run_dir.resolve().name
        if report_to == "tensorboard":
            self._backend = TensorBoardTracker(name, logging_dir=run_dir / "tensorboard")
            self._backend.start()
            if config is not None:
                import yaml

                text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
                self._backend.log({"config": f"```\n{text}\n```"}, step=0)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            project = os.environ.get("WANDB_PROJECT", "dmoerm")
            self._backend = WandBTracker(project, dir=str(run_dir), name=name, config=dict(config or {}))
            try:
                self._backend.start()
            except Exception as e:  # wandb raises its own types (no login, no network)
                raise ValueError(
                    f"report_to: wandb could not start a run ({e}); log in (`wandb login` or WANDB_API_KEY) "
                    "or set WANDB_MODE=offline"
                ) from e
        logger.info("tracking to %s (%s)", report_to, self.location)

    @property
    def enabled(self) -> bool:
        """False for ``report_to="none"``."""
        return self._backend is not None

    @property
    def location(self) -> str | None:
        """The folder the events or the offline run are written to."""
        if self._backend is None:
            return None
        if self.report_to == "tensorboard":
            return self._backend.logging_dir
        return self._backend.run.dir

    def log_stage(self, stage: str, info: Mapping | None = None, history: Mapping | None = None) -> None:
        """Log a finished stage: its ``history`` (``step``/``loss``, ``dev_step``/``dev_agreement``, as
        :class:`dmoerm.training.loop.TrainResult` keeps it) as curves, then the numbers in ``info`` at its last
        step."""
        if self._backend is None:
            return
        history = history or {}
        last = 0
        for step_key, value_key in (("step", "loss"), ("dev_step", "dev_agreement")):
            for step, value in zip(history.get(step_key, ()), history.get(value_key, ())):
                self._log(stage, {f"{stage}/{value_key}": float(value)}, int(step))
                last = max(last, int(step))
        scalars = _scalars(info or {}, stage)
        if scalars:
            self._log(stage, scalars, last)

    def log_results(self, results: Mapping[str, Any], **numbers: float) -> None:
        """Log the test evaluation: ``eval/<system>/agreement`` of each :class:`dmoerm.evaluation.EvalResult`
        and the other ``numbers`` (``eval/router_test_accuracy``)."""
        if self._backend is None:
            return
        info = {name: {"agreement": r.overall.agreement.value} for name, r in results.items()}
        self.log_stage("eval", {**numbers, **info})

    def _log(self, stage: str, values: dict[str, float], step: int) -> None:
        if self.report_to == "tensorboard":
            self._backend.log(values, step=step)
            return
        run = self._backend.run
        step_metric = f"{stage}/step"
        if step_metric not in self._defined:
            # W&B keeps one increasing step per run; each stage plots against its own training step instead.
            run.define_metric(step_metric, hidden=True)
            run.define_metric(f"{stage}/*", step_metric=step_metric)
            self._defined.add(step_metric)
        self._backend.log({**values, step_metric: step})

    def close(self) -> None:
        """Flush and close the writer or finish the W&B run."""
        if self._backend is not None:
            self._backend.finish()
            self._backend = None
