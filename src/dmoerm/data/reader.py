"""The row reader: every row of a container (:mod:`dmoerm.data.files`) through a source's parser, bad rows
raised as :class:`~dmoerm.data.DataError` naming ``file:line: field 'x'`` or, with ``skip_bad``, skipped and
counted in the :class:`~dmoerm.data.LoadReport`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from dmoerm.data.fields import LINE, _Defect, _FieldError, _typename
from dmoerm.data.files import FileProblem, RowProblem, iter_rows
from dmoerm.data.records import DataError, LoadReport

logger = logging.getLogger(__name__)

Parser = Callable[[dict, int], list]
"""``parse(obj, position)``: the records of one row; ``position`` is its line number (row index for Parquet and
``datasets``), the default ``uid``."""


def _read(
    path: Path,
    display: str,
    parse: Parser,
    *,
    skip_bad: bool,
    limit: int | None,
    report: LoadReport,
    split: str | None = None,
) -> list:
    """Parse every row of ``path`` (:func:`dmoerm.data.files.iter_rows`) with ``parse(obj, position)``;
    errors name ``display:line`` (``display:row i`` for Parquet and ``datasets``)."""
    records: list = []
    try:
        for where, position, obj in iter_rows(path, split):
            if limit is not None and len(records) >= limit:
                break
            try:
                if isinstance(obj, RowProblem):
                    raise _FieldError(obj.field or LINE, obj.problem)
                if not isinstance(obj, dict):
                    raise _FieldError(LINE, f"expected a JSON object, got {_typename(obj)}")
                records.extend(parse(obj, position))
            except _Defect as e:
                report.dropped += 1
                report.dropped_lines.append(f"{display}:{where}: {e}")
            except _FieldError as e:
                msg = f"{display}:{where}: {e}"
                if not skip_bad:
                    raise DataError(msg) from None
                report.skipped += 1
                report.skipped_lines.append(msg)
    except FileProblem as e:
        where = f":{e.where}" if e.where is not None else ""
        raise DataError(f"{display}{where}: {e.problem}") from None
    if limit is not None:
        del records[limit:]
    return records


def _log_report(report: LoadReport) -> None:
    if report.skipped:
        logger.warning(
            "%s: skipped %d bad record(s) (skip_bad=True); first: %s",
            report.source,
            report.skipped,
            report.skipped_lines[0],
        )
    if report.dropped:
        logger.warning(
            "%s: dropped %d record(s) with known upstream defects (empty or duplicate responses); first: %s",
            report.source,
            report.dropped,
            report.dropped_lines[0],
        )
    logger.info("%s: loaded %d record(s)", report.source, report.loaded)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: {limit!r}; use a positive integer or None")
