"""``dmoerm train``: the whole job as stages (:mod:`~dmoerm.pipeline.stages`, :mod:`~dmoerm.pipeline.evaluate`)
run in order by :func:`~dmoerm.pipeline.run.run_pipeline`, resumable from ``state.json``
(:mod:`~dmoerm.pipeline.state`); the configs (:mod:`~dmoerm.pipeline.config`), the splits
(:mod:`~dmoerm.pipeline.splits`), the report (:mod:`~dmoerm.pipeline.report`) and the scaling study
(:mod:`~dmoerm.pipeline.scaling`, ``dmoerm scaling``)."""

from dmoerm.pipeline.config import (
    WARM_STARTS,
    DataConfig,
    LabelsConfig,
    PipelineConfig,
    SpecialiseConfig,
    judge_label_config,
)
from dmoerm.pipeline.evaluate import score_cached, standardized_scores
from dmoerm.pipeline.report import eval_folder, write_report
from dmoerm.pipeline.run import PipelineResult, run_pipeline
from dmoerm.pipeline.scaling import (
    OOD_SOURCES,
    ScalingConfig,
    run_scaling,
    summarize,
    write_scaling_report,
)
from dmoerm.pipeline.splits import POOLED, Splits, build_splits, load_preferences
from dmoerm.pipeline.state import (
    StageState,
    forget_lost_model_stages,
    hide_library_bars,
    load_run_model,
    stage_inputs,
)

__all__ = [
    # pipeline.py
    "DataConfig",
    "LabelsConfig",
    "PipelineConfig",
    "SpecialiseConfig",
    "WARM_STARTS",
    "judge_label_config",
    "POOLED",
    "Splits",
    "build_splits",
    "load_preferences",
    "score_cached",
    "standardized_scores",
    "PipelineResult",
    "run_pipeline",
    "eval_folder",
    "write_report",
    # run_state.py
    "StageState",
    "stage_inputs",
    "forget_lost_model_stages",
    "hide_library_bars",
    "load_run_model",
    # scaling.py
    "OOD_SOURCES",
    "ScalingConfig",
    "run_scaling",
    "summarize",
    "write_scaling_report",
]
