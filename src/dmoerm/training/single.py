"""Training the single reward model (the baseline, and the code phase 1 of DMoERM reuses)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dmoerm.data import PreferenceRecord
from dmoerm.encoding import encode_record
from dmoerm.experts import BackboneConfig
from dmoerm.reward_model import MODEL_FILE, RewardModel
from dmoerm.training.distributed import process_accelerator
from dmoerm.training.loop import TrainConfig, TrainResult, save_curves, train_expert
from dmoerm.training.trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


def train_reward_model(
    train: Sequence[PreferenceRecord],
    dev: Sequence[PreferenceRecord],
    model_config: BackboneConfig,
    train_config: TrainConfig,
    output_dir: str | Path,
    cache: TrunkCache | None = None,
    model: RewardModel | None = None,
    progress: bool = True,
) -> tuple[RewardModel, TrainResult | None]:
    """Train a single reward model on human rankings; save it, its resolved configs and curves in ``output_dir``.

    A finished ``output_dir`` is loaded instead of retrained; an interrupted one resumes from its checkpoint.
    Under several processes every rank trains (data-parallel) and rank 0 alone writes ``output_dir``.
    """
    output_dir = Path(output_dir)
    if (output_dir / MODEL_FILE).exists():
        logger.info("%s: finished already, loading it", output_dir)
        return RewardModel.from_pretrained(output_dir), None
    model = model or RewardModel.create(model_config)
    cache = cache if cache is not None else TrunkCache()
    tok, n = model.tokenizer, model.max_length
    train_items = [item for item in (encode_record(tok, r, n) for r in train) if item.pairs]
    dev_items = [item for item in (encode_record(tok, r, n) for r in dev) if item.pairs]
    logger.info(
        "single reward model: %d train and %d dev records with untied pairs", len(train_items), len(dev_items)
    )
    result = train_expert(
        model.bank,
        RewardModel.EXPERT,
        train_items,
        dev_items,
        train_config,
        cache,
        checkpoint_dir=output_dir / "checkpoint",
        desc="single RM" if progress else None,
    )
    accelerator = process_accelerator()
    if accelerator.is_main_process:
        _write_run(output_dir, model, train_config, result)
    accelerator.wait_for_everyone()  # no rank returns before the finished folder exists
    return model, result


def _write_run(output_dir: Path, model: RewardModel, train_config: TrainConfig, result: TrainResult) -> None:
    """The finished run's configs, result, curves and model (the model last: its file means "finished")."""
    (output_dir / "train_config.json").write_text(json.dumps(asdict(train_config), indent=2))
    (output_dir / "train_result.json").write_text(
        json.dumps(
            {
                "steps": result.steps,
                "best_dev_agreement": result.best_dev_agreement,
                "stopped_early": result.stopped_early,
                "history": result.history,
            },
            indent=2,
        )
    )
    save_curves(result.history, output_dir / "curves.png", "single reward model")
    model.save_pretrained(output_dir)  # written last: its marker file means "finished"
