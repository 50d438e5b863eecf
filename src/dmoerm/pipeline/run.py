"""The whole job, from data to a scored reward: router, the three phases of every category, the single
reward model baseline on the same data and budget, and their evaluation side by side.

Resumable: every finished stage is recorded in ``<output_dir>/state.json`` after its outputs are saved
(the model directory is replaced atomically), and a rerun skips it; an interrupted training stage resumes
from its last epoch checkpoint. Nothing finished is lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dmoerm.config_check import check_instance
from dmoerm.model import DMoERM, new_dmoerm
from dmoerm.pipeline.config import PipelineConfig, config_yaml
from dmoerm.pipeline.evaluate import evaluation_stage
from dmoerm.pipeline.files import write_text
from dmoerm.pipeline.labels import _Labeller
from dmoerm.pipeline.report import write_report
from dmoerm.pipeline.stages import (
    RunContext,
    RunData,
    baseline_stage,
    capability_stages,
    data_stage,
    encode_splits,
    likelihood_stage,
    phase1_stage,
    phase3_stage,
    router_stage,
    warm_start_stage,
)
from dmoerm.pipeline.state import (
    StageState,
    forget_lost_model_stages,
    hide_library_bars,
    load_run_model,
    restore_rng_on_resume,
)
from dmoerm.reward_model import MODEL_FILE
from dmoerm.tracking import Tracker
from dmoerm.training.distributed import (
    is_main_process,
    launched_world,
    on_main,
    process_accelerator,
    wait_for_main,
)
from dmoerm.training.sharding import check_sharding
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    output_dir: str
    sizes: dict
    table: str
    """Markdown: per-category agreement of DMoERM and the single reward model on the same held-back data."""
    timings: dict
    router: dict
    """The router stage's state (``accuracy``: on the dev prompts, ``per_category``, prompt counts) and
    ``test_routing_accuracy``: the share of test records the router sent to their own category."""
    report: str
    """Path of report.md."""

    def summary(self) -> str:
        """What ``dmoerm train`` prints: the comparison table, the sizes and where the report is."""
        per_cat = ", ".join(f"{c}: {s['phase1']}/{s['phase3']}/{s['test']}" for c, s in self.sizes.items())
        return (
            f"{self.table}\nRecords per category (phase 1 / phase 3 / test): {per_cat}\n"
            f"Router test accuracy {self.router.get('test_routing_accuracy', float('nan')):.3f}. "
            f"Wall time {self.timings.get('total_this_run')} s. Report: {self.report}\n"
        )


def run_pipeline(
    config: PipelineConfig, progress: bool = True, cache: TrunkCache | None = None
) -> PipelineResult:
    """Run (or resume) the whole job; see the module docstring.

    ``cache`` lets several runs on the same backbone share frozen trunk states (experiments comparing label
    sources); None makes one bounded by ``config.trunk_cache_gb``.
    """
    from dmoerm.evaluation import comparison_table

    check_instance(config)  # the whole resolved config, typed, before any work
    check_sharding(process_accelerator())  # ZeRO-3, a bad FSDP setting: stops here, not after the router
    if not progress:
        hide_library_bars()
    out = Path(config.output_dir)
    stages = _open_state(config, out)
    restore_rng_on_resume(stages)
    main = is_main_process()  # rank 0 alone writes the run folder (pipeline.files) and tracks
    tracker = Tracker(config.report_to if main else "none", out, config=asdict(config))
    timings: dict[str, float] = dict(stages.done.get("_timings", {}))
    t_start = time.perf_counter()
    data = data_stage(config, out)
    model = _open_model(config, data, stages, out / "model")
    if cache is None:
        cache = TrunkCache(int(config.trunk_cache_gb * (1 << 30)), config.trunk_cache_dir)
    run = RunContext(config, out, stages, tracker, cache, timings, progress)
    items = encode_splits(model, data)
    wait_for_main()  # every rank opened the model before rank 0 saves a stage's into model/

    router_stage(run, model, data, items)
    labeller = _Labeller(config, data.label_taxonomy, out / "labels", progress)
    members = warm_start_stage(run, model, data, items)
    for c in data.categories:  # each category's inner model: phase 1, its experts (phase 2), phase 3
        phase1_stage(run, model, c, items)
        label_counts = capability_stages(run, model, data, labeller, c)
        phase3_stage(run, model, c, items, label_counts)
    likelihood_stage(run, model, data, items)
    if config.baseline and not members:
        members = baseline_stage(run, data)
    results, router_test_accuracy = evaluation_stage(run, model, data, items, members)

    timings["total_this_run"] = round(time.perf_counter() - t_start, 2)
    stages.finish("_timings", timings)
    stages.finish("eval", {"router_test_accuracy": router_test_accuracy, "systems": list(results)})
    tracker.log_results(results, router_test_accuracy=router_test_accuracy)
    tracker.close()
    report = write_report(out) if main else out / "report.md"
    table = comparison_table(results, systems_as="columns")
    router_info = dict(stages.done.get("router", {}), test_routing_accuracy=router_test_accuracy)
    return PipelineResult(str(out), data.splits.sizes(), table, timings, router_info, str(report))


def _open_state(config: PipelineConfig, out: Path) -> StageState:
    """The run's resume state, opened (and checked, restarted, written) by rank 0 first; the other ranks then
    read the state.json it left, so every rank skips the same finished stages. A stop on rank 0 (changed
    inputs) stops every rank. Under one process: opened as it always was."""

    def first() -> StageState:
        out.mkdir(parents=True, exist_ok=True)
        stages = StageState(out / "state.json", config)  # stops here if a finished stage had other inputs
        forget_lost_model_stages(stages, out / "model")
        write_text(out / "config.yaml", config_yaml(config))
        return stages

    if launched_world() == 1:
        return first()
    opened: list[StageState] = []
    on_main(lambda: opened.append(first()))  # rank 0 first; the others wait for it
    return opened[0] if opened else StageState(out / "state.json", config)


def _open_model(config: PipelineConfig, data: RunData, stages: StageState, model_dir: Path) -> DMoERM:
    """The run's model: the saved one when a previous run left it (resumed), else a new one."""
    if not (model_dir / MODEL_FILE).exists():
        return new_dmoerm(config.model, data.taxonomy, data.categories, config.routing)
    model = load_run_model(model_dir)
    model.routing = config.routing
    logger.info(
        "resuming from %s (finished: %s)",
        model_dir,
        ", ".join(k for k in stages.done if not k.startswith("_")),
    )
    return model
