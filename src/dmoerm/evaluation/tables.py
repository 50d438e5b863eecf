"""Markdown of evaluation results: the report of one system (``eval.md``) and tables comparing systems."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from dmoerm.evaluation.results import ALL, CategoryMetrics, Estimate, EvalResult


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100.0 * x:.1f}"


def _ci(e: Estimate | None) -> str:
    if e is None or not (math.isfinite(e.ci_low) and math.isfinite(e.ci_high)):
        return "-"
    return f"[{_pct(e.ci_low)}, {_pct(e.ci_high)}]"


def _est_cell(e: Estimate) -> str:
    if e.n == 0:
        return "- (n=0)"
    return f"{_pct(e.value)} {_ci(e)} (n={e.n})"


def _corr(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def _result_markdown(r: EvalResult) -> str:
    level = f"{100 * r.confidence:g}%"
    rows = [r.overall, *r.per_category]
    title = f"Evaluation: {r.system}" if r.system else "Evaluation"
    lines = [f"# {title}", ""]
    o = r.overall
    lines.append(
        f"{o.n_records} records, {o.n_responses} responses, {o.agreement.n} untied human pairs, "
        f"{o.human_ties_excluded} human-tied pairs excluded. Categories from: {r.category_source}. "
        f"Shares in %; {level} CIs: percentile bootstrap over records, {r.n_resamples} resamples, seed {r.seed}. "
        "Reward ties count as half agreement. Longer-wins baseline: the longer response is predicted better. "
        '"Shorter wins" / "longer wins": agreement on the pairs whose human-better response is the shorter / '
        "longer one (equal lengths excluded, counted in the last column)."
    )
    lines += ["", "## Agreement with human preferences", ""]
    lines.append(
        f"| category | records | pairs | human ties excluded | agreement | {level} CI | longer-wins baseline "
        "| agreement when shorter wins | agreement when longer wins | equal-length pairs |"
    )
    lines.append("|---|---:|---:|---:|---:|---|---:|---|---|---:|")
    for row in rows:
        name = f"**{row.category}**" if row.category == ALL else row.category
        a = row.agreement
        ln = row.length
        lines.append(
            f"| {name} | {row.n_records} | {a.n} | {row.human_ties_excluded} | {_pct(a.value)} | {_ci(a)} "
            f"| {_pct(ln.longer_wins_baseline.value)} | {_est_cell(ln.when_shorter_better)} "
            f"| {_est_cell(ln.when_longer_better)} | {ln.equal_length_pairs} |"
        )
    bon_rows = [row for row in rows if row.best_of_n is not None]
    if bon_rows:
        lines += ["", "## Best-of-n accuracy (records with 3 or more responses)", ""]
        lines.append(f"| category | records | accuracy | {level} CI |")
        lines.append("|---|---:|---:|---|")
        for row in bon_rows:
            b = row.best_of_n
            assert b is not None
            lines.append(f"| {row.category} | {b.n} | {_pct(b.value)} | {_ci(b)} |")
    has_tokens = any(row.length.pearson_tokens is not None for row in rows)
    lines += ["", "## Correlation of reward with response length", ""]
    head = "| category | Pearson (chars) | Spearman (chars) | Pearson within prompt (chars) |"
    sep = "|---|---:|---:|---:|"
    if has_tokens:
        head += " Pearson (tokens) | Spearman (tokens) |"
        sep += "---:|---:|"
    lines += [head, sep]
    for row in rows:
        ln = row.length
        line = (
            f"| {row.category} | {_corr(ln.pearson_chars)} | {_corr(ln.spearman_chars)} "
            f"| {_corr(ln.pearson_chars_within_prompt)} |"
        )
        if has_tokens:
            line += f" {_corr(ln.pearson_tokens)} | {_corr(ln.spearman_tokens)} |"
        lines.append(line)
    if r.throughput is not None:
        t = r.throughput
        lines += ["", "## Throughput", ""]
        lines.append(
            f"Scored {o.n_responses} responses ({o.agreement.n} pairs) in {t.seconds:.4g} s: "
            f"{t.responses_per_second:.2f} responses/s, {t.pairs_per_second:.2f} pairs/s "
            f"(batch size {t.batch_size})."
        )
    return "\n".join(lines) + "\n"


def comparison_table(
    results: Mapping[str, EvalResult], *, systems_as: Literal["rows", "columns"] = "rows"
) -> str:
    """One Markdown table comparing systems: overall agreement with its CI, then agreement per category (%).

    Keys of ``results`` name the systems. Categories are the union over systems; a system without a category
    shows ``-``. When every system has the same pair count for a category, the count goes in the header,
    otherwise (e.g. categories from each system's own router) into each cell.
    """
    if not results:
        raise ValueError("comparison_table: no results")
    names = list(results)
    cats = sorted({c for r in results.values() for c in r.categories})
    columns = [ALL, *cats]

    def lookup(r: EvalResult, c: str) -> CategoryMetrics | None:
        try:
            return r.category(c)
        except KeyError:
            return None

    headers: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for c in columns:
        counts = {m.agreement.n for r in results.values() if (m := lookup(r, c)) is not None}
        same = len(counts) == 1
        label = "overall" if c == ALL else c
        headers.append(f"{label} (n={counts.pop()})" if same else label)
        for s in names:
            m = lookup(results[s], c)
            if m is None:
                cells[s, c] = "-"
                continue
            text = _pct(m.agreement.value)
            if c == ALL:
                text += f" {_ci(m.agreement)}"
            if not same:
                text += f" (n={m.agreement.n})"
            cells[s, c] = text
    if systems_as == "rows":
        lines = ["| system | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
        lines += ["| " + s + " | " + " | ".join(cells[s, c] for c in columns) + " |" for s in names]
    elif systems_as == "columns":
        lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [
            "| " + h + " | " + " | ".join(cells[s, c] for s in names) + " |"
            for h, c in zip(headers, columns, strict=True)
        ]
    else:
        raise ValueError(f"systems_as: use 'rows' or 'columns', got {systems_as!r}")
    return "\n".join(lines) + "\n"


def length_table(results: Mapping[str, EvalResult], category: str = ALL) -> str:
    """One Markdown table comparing systems on length: agreement beside the length-controlled agreements.

    One row per system (keys of ``results``) for ``category`` (default: all records): raw agreement, the
    longer-wins baseline on the same pairs, agreement when the shorter response is the better one and when the
    longer is (each with its interval and pair count), and the reward's Pearson correlation with length in
    characters, within prompt, and in tokens where token lengths were given. A system without the category
    shows ``-``.
    """
    if not results:
        raise ValueError("length_table: no results")
    lines = [
        "| system | agreement | longer-wins baseline | agreement when shorter wins "
        "| agreement when longer wins | r(reward, chars) | r within prompt (chars) | r(reward, tokens) |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        try:
            m = r.category(category)
        except KeyError:
            lines.append(f"| {name} |" + " - |" * 7)
            continue
        ln = m.length
        lines.append(
            f"| {name} | {_est_cell(m.agreement)} | {_est_cell(ln.longer_wins_baseline)} "
            f"| {_est_cell(ln.when_shorter_better)} | {_est_cell(ln.when_longer_better)} "
            f"| {_corr(ln.pearson_chars)} | {_corr(ln.pearson_chars_within_prompt)} | {_corr(ln.pearson_tokens)} |"
        )
    return "\n".join(lines) + "\n"
