"""The ``dmoerm`` command. Each subcommand only parses its arguments and calls one library function.

Options of a subcommand are generated from the fields of the config dataclass of that function (every field
becomes ``--field-name``, with the field's documentation as help), so the command line and the Python API
can never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("dmoerm")


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (the convention of every config in this package),
    inherited ones included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _scalar(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is a list, may be None) of a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        return (typing.get_args(tp) or (str,))[0], True, optional
    return tp, False, optional


def _parse_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls`` (required fields are required options)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, many, optional = _scalar(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if kind is bool and not many:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if kind not in (str, int, float):
            continue  # nested settings are reachable from config files only
        parse = _parse_none(kind) if optional else kind
        if many:
            kwargs["nargs"] = "+"
        parser.add_argument(flag, type=parse, required=required, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the options the user gave (the rest keep the dataclass defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(extra)
    return cls(**given)


# ------------------------------------------------------------------------------------------ subcommands
def _train(args: argparse.Namespace) -> int:
    from dmoerm.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig.from_file(args.config, args.set or ())
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.restart_changed:
        config.resume = "restart"
    result = run_pipeline(config, progress=not args.no_progress)
    sys.stdout.write(result.summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dmoerm.evaluation import EvalConfig, run_eval

    result = run_eval(config_from_args(EvalConfig, args))
    sys.stdout.write(result.to_markdown())
    return 0


def _label(args: argparse.Namespace) -> int:
    from dmoerm.labelling.pipeline import LabelConfig, run_label

    stats = run_label(config_from_args(LabelConfig, args))
    sys.stdout.write(json.dumps(stats.to_dict(), indent=2) + "\n")
    return 0


def _label_quality(args: argparse.Namespace) -> int:
    from dmoerm.labelling.agreement import report_markdown
    from dmoerm.labelling.quality import QualityConfig, run_quality

    report = run_quality(config_from_args(QualityConfig, args))
    sys.stdout.write(report_markdown(report))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dmoerm.serving import ServeModelConfig, serve_model

    serve_model(config_from_args(ServeModelConfig, args))
    return 0


def _finegrained(args: argparse.Namespace) -> int:
    from dmoerm.evaluation.finegrained import FineGrainedConfig, finegrained_markdown, run_finegrained

    results = run_finegrained(config_from_args(FineGrainedConfig, args))
    sys.stdout.write(finegrained_markdown(results))
    return 0


def _eval_judge(args: argparse.Namespace) -> int:
    from dmoerm.labelling.judge_eval import JudgeEvalConfig, run_judge_eval

    result = run_judge_eval(config_from_args(JudgeEvalConfig, args))
    sys.stdout.write(result.to_markdown())
    return 0


def _overopt(args: argparse.Namespace) -> int:
    from dmoerm.evaluation.overopt import OverOptConfig, overopt_markdown, run_overopt

    results = run_overopt(config_from_args(OverOptConfig, args))
    sys.stdout.write(overopt_markdown(results))
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from dmoerm.pipeline.scaling import ScalingConfig, run_scaling, summarize, write_scaling_report

    config = ScalingConfig.from_file(args.config)
    if args.report_only:
        path = write_scaling_report(summarize(Path(config.output_dir), config), Path(config.output_dir))
    else:
        run_scaling(config, progress=not args.no_progress, only=args.only or ())
        path = Path(config.output_dir) / "scaling.md"
    sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0


def _normalize(args: argparse.Namespace) -> int:
    from dmoerm.rl import NormalizeModelConfig, normalize_model

    norm = normalize_model(config_from_args(NormalizeModelConfig, args))
    sys.stdout.write(json.dumps(dataclasses.asdict(norm), indent=2) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dmoerm.export import export_model

    result = export_model(args.model, args.out, overwrite=args.overwrite, check=not args.no_check)
    sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dmoerm.pipeline import write_report

    path = write_report(args.run)
    sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="router, three phases per category, single-RM baseline, evaluation")
    p.add_argument("--config", required=True, help="YAML/JSON pipeline config (see configs/main.yaml)")
    p.add_argument("--output-dir", help="override output_dir of the config")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (YAML value), e.g. --set phase1.length_penalty=1.0; repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--restart-changed",
        action="store_true",
        help="resuming with a config that changed a finished stage's inputs: train that stage and every stage "
        "after it again (default: stop with an error naming the changed fields)",
    )
    p.set_defaults(handler=_train)


def _config_commands() -> list[tuple[str, str, type, Callable[[argparse.Namespace], int]]]:
    """(name, help, config dataclass, handler) of each subcommand whose options are one config's fields."""
    from dmoerm.evaluation import EvalConfig
    from dmoerm.evaluation.finegrained import FineGrainedConfig
    from dmoerm.evaluation.overopt import OverOptConfig
    from dmoerm.labelling.judge_eval import JudgeEvalConfig
    from dmoerm.labelling.pipeline import LabelConfig
    from dmoerm.labelling.quality import QualityConfig
    from dmoerm.rl import NormalizeModelConfig
    from dmoerm.serving import ServeModelConfig

    return [
        ("eval", "agreement of a saved model with human labels, per category, with CIs", EvalConfig, _eval),
        (
            "eval-judge",
            "an LLM judge as a zero-shot evaluator (both orders), same metrics as eval",
            JudgeEvalConfig,
            _eval_judge,
        ),
        (
            "label",
            "capability labels from an LLM judge (both orders, cached, resumable)",
            LabelConfig,
            _label,
        ),
        (
            "label-quality",
            "a judge's agreement with human labels and its position bias",
            QualityConfig,
            _label_quality,
        ),
        ("serve", "HTTP reward server (OpenRLHF /get_reward and /score)", ServeModelConfig, _serve),
        (
            "normalize",
            "measure reward mean/std on reference data and store them with the model",
            NormalizeModelConfig,
            _normalize,
        ),
        (
            "finegrained",
            "phase 2 on FineGrainedRLHF human aspect labels vs the local judge's labels",
            FineGrainedConfig,
            _finegrained,
        ),
        (
            "overopt",
            "best-of-n over-optimisation: noisy proxies (DMoERM, single, ensembles) vs a gold RM",
            OverOptConfig,
            _overopt,
        ),
    ]


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_text, config_class, handler in _config_commands():
        p = sub.add_parser(name, help=help_text)
        add_config_arguments(p, config_class)
        p.set_defaults(handler=handler)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """The commands over finished runs and saved models: scaling, export, report."""
    p = sub.add_parser(
        "scaling", help="the scaling study: DMoERM and the single RM at several records per category"
    )
    p.add_argument("--config", required=True, help="YAML of dmoerm.pipeline.scaling.ScalingConfig fields")
    p.add_argument("--report-only", action="store_true", help="rewrite scaling.md from finished runs")
    p.add_argument(
        "--only",
        action="append",
        metavar="RUN",
        help="run (or resume) only this run of the study, e.g. ablation_cold_start_n384 (repeatable); "
        "scaling.md still covers every finished run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_scaling)

    p = sub.add_parser(
        "export",
        help="write a Hugging Face folder: plain AutoModelForSequenceClassification or remote-code DMoERM",
    )
    p.add_argument("--model", required=True, help="a dmoerm model directory (single reward model or DMoERM)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--no-check", action="store_true", help="skip comparing the export's rewards with dmoerm's"
    )
    p.set_defaults(handler=_export)

    p = sub.add_parser("report", help="(re)write report.md of a training run from its saved results")
    p.add_argument("--run", required=True, help="output_dir of a `dmoerm train` run")
    p.set_defaults(handler=_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmoerm", description="Train, evaluate and serve DMoERM reward models (Quan 2024)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_command(sub)
    _add_config_commands(sub)
    _add_run_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from dmoerm.config_check import RunStopped

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RunStopped) as e:
        # Bad input: one clear line naming the file/field, no traceback (use -v for one).
        if args.verbose:
            raise
        logger.error("%s", e)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
