"""The result tables, from finished runs: plain arithmetic on their metrics, no I/O but
:meth:`Table.write`.

:class:`Table` holds one table (markdown cells for people, CSV values for programs);
:func:`comparison_table` (mean ± std over seeds, gains over a reference, the oracle's
ceilings), :func:`ieb_decile_table`, :func:`ranking_table` (with :func:`kendall_tau`) and
:func:`bias_sweep_table` (with :func:`gap_with_error`) build them; :func:`mean_std` and the
``fmt_*`` functions format the numbers as the paper prints them.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.datasets import auc_standard_error

if TYPE_CHECKING:
    from experiments.runner import RunResult

__all__ = [
    "COMPARED",
    "CSV_METRICS",
    "ORACLE",
    "Table",
    "bias_sweep_table",
    "ceiling_gain_table",
    "ceiling_table",
    "comparison_table",
    "fmt_auc",
    "fmt_gain",
    "fmt_gap",
    "fmt_ratio",
    "gap_with_error",
    "group",
    "ieb_decile_table",
    "kendall_tau",
    "map_table",
    "mean_std",
    "memorisation_table",
    "paired_gap_with_error",
    "ranking_table",
    "seed_effects",
    "spread_table",
    "stat",
]


@dataclass
class Table:
    """A result table: rows of cells, written as markdown and CSV."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv_path = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(self.markdown())
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_header)
            writer.writerows(self.csv_rows)
        return [md, csv_path]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for one value)."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def fmt_auc(mean: float, std: float) -> str:
    """An AUC in points as the paper prints it: ``68.56 ± 0.37``."""
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")


def fmt_ratio(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def fmt_epoch(mean: float, std: float) -> str:
    """The mean kept epoch over seeds (chosen on the validation day), ``n/a`` without one.

    Example (one seed: no spread to show):
        >>> fmt_epoch(2.0, 0.0), fmt_epoch(1.6, 0.49), fmt_epoch(float("nan"), float("nan"))
        ('2', '1.6 ± 0.5', 'n/a')
        >>> fmt_epoch(2.0, float("nan"))
        '2'
    """
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.0f}" if std == 0 or math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def fmt_gain(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base):
        return "n/a"
    return f"{100 * (value - base):+.2f}"


def group(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Results by label, in first-seen order."""
    grouped: dict[str, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.spec.label, []).append(result)
    return grouped


def stat(results: Sequence[RunResult], metric: str) -> tuple[float, float]:
    return mean_std([r.metrics.get(metric, math.nan) for r in results])


COMPARED = (
    ("cvr_auc", "CVR AUC (clicked)"),
    ("ctcvr_auc", "CTCVR AUC"),
    ("entire_space_cvr_auc", "CVR AUC (entire space)"),
)
CSV_METRICS = (
    "ctr_auc",
    "cvr_auc",
    "ctcvr_auc",
    "entire_space_cvr_auc",
    "cvr_ieb",
    "cvr_ieb_clicked",
    "cvr_ieb_vs_counterfactual",
    "cvr_logloss",
    "ctcvr_logloss",
    "kept_epoch",
)
ORACLE = (
    ("cvr_auc", "oracle_cvr_auc"),
    ("ctcvr_auc", "oracle_ctcvr_auc"),
    ("entire_space_cvr_auc", "oracle_entire_space_cvr_auc"),
)


def comparison_table(
    name: str,
    title: str,
    label_header: str,
    results: Sequence[RunResult],
    reference: str | None,
    notes: Sequence[str] = (),
) -> Table:
    """Mean ± std over seeds of the compared AUCs and the IEB, gains over ``reference``,
    and the oracle's ceilings as the last row."""
    grouped = group(results)
    ref = grouped.get(reference) if reference else None
    header = [label_header, "seeds"]
    for _, title_ in COMPARED:
        header.append(title_)
        if ref:
            header.append(f"gain vs {reference}")
    header.append("pCVR IEB (mean pCVR / true)")
    header.append("kept epoch")
    rows, csv_rows = [], []
    for label, group_results in grouped.items():
        row = [label, str(len(group_results))]
        gains = (
            {m: paired_gap_with_error(ref, group_results, m) for m, _ in COMPARED} if ref else {}
        )
        for metric, _ in COMPARED:
            mean, std = stat(group_results, metric)
            row.append(fmt_auc(mean, std))
            if ref:
                is_ref = group_results is ref
                row.append(
                    fmt_gain(mean, stat(ref, metric)[0]) if is_ref else fmt_gap(*gains[metric])
                )
        row.append(fmt_ratio(*stat(group_results, "cvr_ieb")))
        row.append(fmt_epoch(*stat(group_results, "kept_epoch")))
        rows.append(row)
        csv_row: list[Any] = [label, len(group_results)]
        for metric in CSV_METRICS:
            csv_row.extend(stat(group_results, metric))
        for gain in gains.values():
            csv_row.extend(gain)
        csv_row.append(" ".join(r.run_id for r in group_results))
        csv_rows.append(csv_row)
    everything = list(results)
    oracle_row = ["oracle (true pCTR, pCVR)", "-"]
    for metric, oracle_metric in ORACLE:
        oracle_row.append(fmt_auc(stat(everything, oracle_metric)[0], math.nan))
        if ref:
            oracle_row.append(fmt_gain(stat(everything, oracle_metric)[0], stat(ref, metric)[0]))
    oracle_row.append("1.000")
    oracle_row.append("-")
    rows.append(oracle_row)
    csv_header = [label_header, "seeds"]
    for metric in CSV_METRICS:
        csv_header += [f"{metric}_mean", f"{metric}_std"]
    if ref:
        for metric, _ in COMPARED:
            csv_header += [f"gain_{metric}", f"gain_{metric}_stderr"]
    csv_header.append("mlflow_run_ids")
    notes = list(notes)
    if ref:
        notes.append(
            f"Gains over {reference} ± their standard error. Where a method ran the same "
            f"seeds as {reference} (2 or more), the error is paired: the std of the per-seed "
            "differences / sqrt(n), since a seed fixes the initialisation and the batch order "
            "of every method alike; otherwise sqrt(s_a²/n_a + s_b²/n_b)."
        )
        effects = seed_effects(results, "entire_space_cvr_auc")
        if effects:
            notes.append(
                "Seed effect on CVR AUC (entire space), each seed's mean over methods of its "
                "run minus its method's mean, in points: "
                + ", ".join(f"seed {s} {100 * e:+.2f}" for s, e in effects.items())
                + "."
            )
    return Table(name, title, header, rows, csv_header, csv_rows, notes)


def _by_seed(results: Sequence[RunResult], metric: str) -> dict[int, float]:
    return {r.spec.seed: r.metrics.get(metric, math.nan) for r in results}


def paired_gap_with_error(
    base: Sequence[RunResult], other: Sequence[RunResult], metric: str
) -> tuple[float, float]:
    """mean(other) - mean(base) and its standard error, paired by seed where both sides ran
    the same 2 or more seeds (each once): the std of the per-seed differences / sqrt(n).
    Otherwise :func:`gap_with_error`'s unpaired error. A seed fixes the initialisation and
    the batch order of every variant alike, so what a seed adds to one method's AUC it
    largely adds to the other's; pairing takes that common part out of the error.

    Example (the same two seeds: the differences are 3.0 and 3.0 points, no spread):
        >>> from experiments.runner import RunResult, RunSpec
        >>> from experiments.config import DataSpec
        >>> runs = lambda label, *aucs: [
        ...     RunResult(RunSpec(label, label, s, DataSpec()), "id", {"cvr_auc": a}, 1.0)
        ...     for s, a in enumerate(aucs)]
        >>> base, esmm = runs("base", 0.70, 0.72), runs("esmm", 0.73, 0.75)
        >>> fmt_gap(*paired_gap_with_error(base, esmm, "cvr_auc"))
        '+3.00 ± 0.00'
        >>> fmt_gap(*gap_with_error(base, esmm, "cvr_auc"))
        '+3.00 ± 1.41'
        >>> fmt_gap(*paired_gap_with_error(base, runs("esmm", 0.73, 0.75, 0.74), "cvr_auc"))
        '+3.00 ± 1.15'
    """
    a, b = _by_seed(base, metric), _by_seed(other, metric)
    paired = len(a) == len(base) and len(b) == len(other) and a.keys() == b.keys()
    diffs = [b[s] - a[s] for s in a] if paired else []
    if len(diffs) < 2 or any(math.isnan(d) for d in diffs):
        return gap_with_error(base, other, metric)
    mean, std = mean_std(diffs)
    return mean, std / math.sqrt(len(diffs))


def seed_effects(results: Sequence[RunResult], metric: str) -> dict[int, float]:
    """Per seed, the mean over labels of (that seed's run − the label's mean): what a seed
    adds to every method alike. Only labels that ran 2 or more distinct seeds count; empty
    when fewer than 2 labels do (one method's deviations are its own spread, not a shared
    effect).

    Example (seed 2 is half a point better for both methods):
        >>> from experiments.runner import RunResult, RunSpec
        >>> from experiments.config import DataSpec
        >>> run = lambda label, s, a: RunResult(RunSpec(label, label, s, DataSpec()), "id",
        ...                                     {"auc": a}, 1.0)
        >>> runs = [run("base", 1, 0.700), run("base", 2, 0.710),
        ...         run("esmm", 1, 0.690), run("esmm", 2, 0.700)]
        >>> {s: round(100 * e, 2) for s, e in seed_effects(runs, "auc").items()}
        {1: -0.5, 2: 0.5}
    """
    deviations: dict[int, list[float]] = {}
    labels = 0
    for group_results in group(results).values():
        values = _by_seed(group_results, metric)
        if len(values) < 2 or len(values) != len(group_results):
            continue
        labels += 1
        mean = mean_std(list(values.values()))[0]
        for seed, value in values.items():
            deviations.setdefault(seed, []).append(value - mean)
    if labels < 2:
        return {}
    return {s: float(np.mean(d)) for s, d in sorted(deviations.items())}


def ieb_decile_table(results: Sequence[RunResult]) -> Table:
    """pCVR / true pCVR within deciles of the model's pCTR (where does the IEB live?)."""
    grouped = group(results)
    deciles = range(1, 11)
    header = ["model", *[f"d{d}" for d in deciles]]
    rows, csv_rows = [], []
    for label, group_results in grouped.items():
        means = [stat(group_results, f"cvr_ieb_ctr_decile_{d}")[0] for d in deciles]
        rows.append([label, *["n/a" if math.isnan(m) else f"{m:.2f}" for m in means]])
        csv_rows.append([label, *means])
    return Table(
        "ieb_by_ctr_decile",
        "pCVR estimation bias by decile of the model's pCTR (mean over seeds; 1.00 = unbiased)",
        header,
        rows,
        header,
        csv_rows,
        ["d1 = the tenth of impressions with the lowest model pCTR, d10 the highest."],
    )


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two score lists (1 = same order, -1 = reversed)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return math.nan
    score = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(score / len(pairs))


def ranking_table(results: Sequence[RunResult]) -> Table:
    """Methods ranked by clicked-only CVR AUC (the paper's test) and by entire-space CVR AUC."""
    grouped = group(results)
    labels = list(grouped)
    clicked = [stat(grouped[label], "cvr_auc")[0] for label in labels]
    entire = [stat(grouped[label], "entire_space_cvr_auc")[0] for label in labels]
    ctcvr = [stat(grouped[label], "ctcvr_auc")[0] for label in labels]

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=lambda i: -values[i])
        result = [0] * len(values)
        for position, index in enumerate(order, start=1):
            result[index] = position
        return result

    rank_clicked, rank_entire, rank_ctcvr = ranks(clicked), ranks(entire), ranks(ctcvr)
    order = sorted(range(len(labels)), key=lambda i: rank_entire[i])
    header = [
        "model",
        "CVR AUC (entire space)",
        "rank (entire space)",
        "CVR AUC (clicked)",
        "rank (clicked)",
        "rank (CTCVR AUC)",
        "rank shift",
    ]
    rows, csv_rows = [], []
    for i in order:
        shift = rank_clicked[i] - rank_entire[i]
        rows.append(
            [
                labels[i],
                fmt_auc(*stat(grouped[labels[i]], "entire_space_cvr_auc")),
                str(rank_entire[i]),
                fmt_auc(*stat(grouped[labels[i]], "cvr_auc")),
                str(rank_clicked[i]),
                str(rank_ctcvr[i]),
                f"{shift:+d}" if shift else "0",
            ]
        )
        csv_rows.append(
            [labels[i], entire[i], rank_entire[i], clicked[i], rank_clicked[i], rank_ctcvr[i]]
        )
    notes = [
        f"Kendall's tau between the clicked-only and the entire-space ranking: "
        f"{kendall_tau(clicked, entire):.2f}; between the CTCVR-AUC and the entire-space "
        f"ranking: {kendall_tau(ctcvr, entire):.2f} (1 = same order).",
        "rank shift = rank by clicked-only CVR AUC minus rank by entire-space CVR AUC "
        "(positive: the paper's protocol under-rates the method).",
    ]
    csv_header = [
        "model",
        "entire_space_cvr_auc",
        "rank_entire_space",
        "cvr_auc_clicked",
        "rank_clicked",
        "rank_ctcvr",
    ]
    return Table(
        "ranking",
        "Ranking of methods: clicked-only vs entire-space CVR AUC",
        header,
        rows,
        csv_header,
        csv_rows,
        notes,
    )


def bias_sweep_table(results_by_bias: dict[float, list[RunResult]], variants: list[str]) -> Table:
    """Per bias value: each variant's CVR AUCs and the last variant's gap over the first."""
    first, last = variants[0], variants[-1]
    header = ["selection bias"]
    for _metric, title in (COMPARED[0], COMPARED[2]):
        header += [f"{v} {title}" for v in variants] + [f"{last} − {first} ({title}, points)"]
    header.append(f"{last} − {first} (CTCVR AUC, points)")
    rows, csv_rows = [], []
    for bias, results in sorted(results_by_bias.items()):
        grouped = group(results)
        row, csv_row = [f"{bias:g}"], [bias]
        for metric in ("cvr_auc", "entire_space_cvr_auc", "ctcvr_auc"):
            if metric != "ctcvr_auc":
                for variant in variants:
                    row.append(fmt_auc(*stat(grouped.get(variant, []), metric)))
            gap, err = gap_with_error(grouped.get(first, []), grouped.get(last, []), metric)
            row.append(f"{100 * gap:+.2f} ± {100 * err:.2f}" if not math.isnan(gap) else "n/a")
            csv_row += [gap, err]
        rows.append(row)
        csv_rows.append(csv_row)
    csv_header = ["selection_bias"]
    for metric in ("cvr_auc", "entire_space_cvr_auc", "ctcvr_auc"):
        csv_header += [f"gap_{metric}", f"gap_{metric}_stderr"]
    return Table(
        "bias_sweep",
        f"{last} vs {first} as the simulator's selection bias grows",
        header,
        rows,
        csv_header,
        csv_rows,
        ["gap ± its standard error (sqrt(s_a²/n_a + s_b²/n_b) over seeds)."],
    )


def gap_with_error(
    base: Sequence[RunResult], other: Sequence[RunResult], metric: str
) -> tuple[float, float]:
    """mean(other) - mean(base) and the standard error of that difference; the error is NaN
    (unknown, printed without ``±``) where a side has a single run, whose spread is unknown.

    Example:
        >>> from experiments.runner import RunResult, RunSpec
        >>> from experiments.config import DataSpec
        >>> runs = lambda label, *aucs: [
        ...     RunResult(RunSpec(label, label, s, DataSpec()), "id", {"cvr_auc": a}, 1.0)
        ...     for s, a in enumerate(aucs)]
        >>> fmt_gap(*gap_with_error(runs("base", 0.70, 0.72), runs("esmm", 0.73, 0.75), "cvr_auc"))
        '+3.00 ± 1.41'
        >>> fmt_gap(*gap_with_error(runs("base", 0.70), runs("esmm", 0.73, 0.75), "cvr_auc"))
        '+4.00'
    """
    if not base or not other:
        return math.nan, math.nan
    m_base, s_base = stat(base, metric)
    m_other, s_other = stat(other, metric)
    var = sum(std**2 / n for std, n in ((s_base, len(base)), (s_other, len(other))))
    return m_other - m_base, math.sqrt(var)


def fmt_gap(gap: float, err: float) -> str:
    """A gap in points with its standard error: ``+0.52 ± 0.21`` (``n/a`` without runs).

    Example:
        >>> fmt_gap(0.0052, 0.0021), fmt_gap(float("nan"), float("nan"))
        ('+0.52 ± 0.21', 'n/a')
    """
    if math.isnan(gap):
        return "n/a"
    return f"{100 * gap:+.2f}" + ("" if math.isnan(err) else f" ± {100 * err:.2f}")


MAP_METRICS = (("cvr_auc", "clicked"), ("entire_space_cvr_auc", "entire space"))


def map_table(
    cells: dict[tuple[str, float], list[RunResult]],
    variants: Sequence[str],
    reference: str,
    notes: dict[tuple[str, float], str] | None = None,
) -> Table:
    """One row per (sparsity level, selection bias) cell: every ``variant − reference`` gap
    of CVR AUC on clicked impressions and on the entire space, each ± its standard error
    over seeds, the reference's own AUCs and the mean kept epochs.

    ``cells`` maps ``(level, bias)`` to that cell's results (labels = variants), in the
    order the rows should appear. ``notes`` describes each cell's data in a column."""
    others = [v for v in variants if v != reference]
    header = ["sparsity level", "data", "selection bias", "seeds"]
    header += [f"{reference} CVR AUC ({where})" for _, where in MAP_METRICS]
    header += [f"{v} − {reference} ({where})" for v in others for _, where in MAP_METRICS]
    header.append("kept epoch (" + ", ".join(variants) + ")")
    csv_header = ["level", "selection_bias", "seeds"]
    csv_header += [f"{reference}_{m}" for m, _ in MAP_METRICS]
    for v in others:
        for m, _ in MAP_METRICS:
            csv_header += [f"{v}_minus_{reference}_{m}", f"{v}_minus_{reference}_{m}_stderr"]
    rows, csv_rows = [], []
    for (level, bias), results in cells.items():
        grouped = group(results)
        ref = grouped.get(reference, [])
        seeds = min((len(grouped.get(v, [])) for v in variants), default=0)
        row = [level, (notes or {}).get((level, bias), ""), f"{bias:g}", str(seeds)]
        csv_row: list[Any] = [level, bias, seeds]
        for metric, _ in MAP_METRICS:
            row.append(fmt_auc(*stat(ref, metric)))
            csv_row.append(stat(ref, metric)[0])
        for v in others:
            for metric, _ in MAP_METRICS:
                gap, err = gap_with_error(ref, grouped.get(v, []), metric)
                row.append(fmt_gap(gap, err))
                csv_row += [gap, err]
        row.append(", ".join(fmt_epoch(*stat(grouped.get(v, []), "kept_epoch")) for v in variants))
        rows.append(row)
        csv_rows.append(csv_row)
    return Table(
        "map",
        f"When does it help? Each method's CVR AUC gain over {reference}, by sparsity and "
        "selection bias",
        header,
        rows,
        csv_header,
        csv_rows,
        [
            "Gaps in AUC points, difference of the seed means ± its standard error "
            "(sqrt(s_a²/n_a + s_b²/n_b)); every run keeps its best epoch on the validation "
            "day and is scored once on the test day(s).",
        ],
    )


MEMORISATION_METRICS = (
    ("kept_valid_cvr_auc", "valid CVR AUC (clicked)"),
    ("kept_valid_ctr_auc", "valid CTR AUC"),
)


def _gap_cells(
    reference: Sequence[RunResult],
    runs: Sequence[RunResult],
    metrics: Sequence[str],
    is_reference: bool,
) -> tuple[list[str], list[float]]:
    """One row's cells for ``runs`` against ``reference``: per metric its mean ± std and its
    gap ± standard error (``-`` on the reference row itself), then the kept epoch; and the
    CSV values (mean, std, gap, gap s.e. per metric, then the mean kept epoch)."""
    cells: list[str] = []
    values: list[float] = []
    for metric in metrics:
        gap, err = gap_with_error(reference, runs, metric)
        cells += [fmt_auc(*stat(runs, metric)), "-" if is_reference else fmt_gap(gap, err)]
        values += [*stat(runs, metric), gap, err]
    cells.append(fmt_epoch(*stat(runs, "kept_epoch")))
    values.append(stat(runs, "kept_epoch")[0])
    return cells, values


SPREAD_METRICS = (
    ("kept_valid_entire_space_cvr_auc", "valid entire-space CVR AUC"),
    ("kept_valid_cvr_auc", "valid CVR AUC (clicked)"),
)


def memorisation_table(
    results_by_dataset: dict[str, list[RunResult]], variants: Sequence[str], reference: str
) -> Table:
    """Per dataset and setting (labels): each variant's kept-epoch VALIDATION metrics, the
    gain over the ``reference`` setting ± its standard error, and the kept epoch. Test-day
    metrics are deliberately absent: these choose defaults."""
    return settings_table(
        results_by_dataset,
        variants,
        reference,
        MEMORISATION_METRICS,
        "memorisation",
        "Remedies of id memorisation, judged on the validation day only",
        f"Metrics of each run's kept epoch on the validation day (mean ± std over seeds); "
        f"gain = setting − `{reference}` ± its standard error, in points. The test day "
        "is not shown: this table chooses the trainer's defaults, and a default is kept "
        "only when it raises the validation CVR AUC of every variant by more than its "
        "standard error.",
    )


def spread_table(
    results_by_dataset: dict[str, list[RunResult]], variants: Sequence[str], reference: str
) -> Table:
    """:func:`memorisation_table`'s layout for the settings that might steady a training
    over seeds: the validation entire-space CVR AUC (its std is the point) and the clicked
    one, each against the ``reference`` setting. Test-day metrics are absent: these choose
    defaults."""
    return settings_table(
        results_by_dataset,
        variants,
        reference,
        SPREAD_METRICS,
        "spread",
        "What steadies a training over seeds, judged on the validation day only",
        f"Metrics of each run's kept epoch on the validation day (mean ± std over seeds: the "
        f"std is what this table is about); change = setting − `{reference}` ± its standard "
        "error, in points. The test day is not shown: this table chooses the trainer's "
        "defaults. A setting is kept as a default only if, for every variant, it lowers the "
        "std of the validation entire-space CVR AUC and lowers neither validation AUC by "
        "more than its standard error.",
    )


def settings_table(
    results_by_dataset: dict[str, list[RunResult]],
    variants: Sequence[str],
    reference: str,
    metrics: Sequence[tuple[str, str]],
    name: str,
    title: str,
    note: str,
) -> Table:
    """Per dataset and setting (labels): each variant's ``metrics`` (key, title) of the kept
    epoch, the change from the ``reference`` setting ± its standard error, and the kept
    epoch."""
    header = ["dataset", "setting"]
    csv_header = ["dataset", "setting", "variant", "seeds"]
    for v in variants:
        for _, column in metrics:
            header += [f"{v} {column}", "change"]
        header.append(f"{v} kept epoch")
    for metric, _ in metrics:
        csv_header += [f"{metric}_mean", f"{metric}_std", f"{metric}_gain", f"{metric}_gain_se"]
    csv_header.append("kept_epoch_mean")
    rows, csv_rows = [], []
    for dataset, results in results_by_dataset.items():
        by_label: dict[str, dict[str, list[RunResult]]] = {}
        for r in results:
            by_label.setdefault(r.spec.label, {}).setdefault(r.spec.variant, []).append(r)
        ref = by_label.get(reference, {})
        for label, by_variant in by_label.items():
            row = [dataset, label]
            for v in variants:
                runs = by_variant.get(v, [])
                cells, values = _gap_cells(
                    ref.get(v, []), runs, [m for m, _ in metrics], label == reference
                )
                row += cells
                csv_rows.append([dataset, label, v, len(runs), *values])
            rows.append(row)
    return Table(name, title, header, rows, csv_header, csv_rows, [note])


def dataset_table(stats: dict[str, tuple[Any, dict[str, Any] | None]]) -> Table:
    """One row per named dataset: its spec in brief, the sizes and positives of its splits,
    how precisely its test split measures a clicked CVR AUC and its cold share. ``stats``
    maps a name to ``(DataSpec, kept statistics or None)``."""
    header = [
        "dataset",
        "preset, bias",
        "train impressions",
        "CTR",
        "CVR given click",
        "train conversions",
        "valid conversions",
        "test conversions",
        "test clicked CVR AUC s.e. (at 0.70)",
        "cold test impressions (item < 5 train clicks)",
    ]
    csv_header = [
        "dataset",
        "key",
        "train_impressions",
        "ctr",
        "cvr_given_click",
        "train_conversions",
        "valid_conversions",
        "test_conversions",
        "test_cvr_auc_se_at_0.7",
        "cold_share",
    ]
    rows, csv_rows = [], []
    for name, (spec, st) in stats.items():
        if st is None:
            rows.append([name, f"{spec.preset}, {spec.selection_bias:g}", *["n/a"] * 8])
            csv_rows.append([name, spec.key(), *[math.nan] * 8])
            continue
        train, test = st["train"], st["test"]
        valid = st.get("valid", {})
        se = test.get("cvr_auc_se_at_0.7")
        if se is None:  # statistics kept before the field existed: the same formula
            se = auc_standard_error(0.7, test["conversions"], test["clicks"] - test["conversions"])
        cold = st["cold"]["test_impressions_share"]
        rows.append(
            [
                name,
                f"{spec.preset}, {spec.selection_bias:g}",
                str(train["impressions"]),
                f"{100 * train['ctr']:.2f}%",
                f"{100 * train['cvr_given_click']:.2f}%",
                str(train["conversions"]),
                str(valid.get("conversions", "-")),
                str(test["conversions"]),
                "n/a" if math.isnan(se) else f"{100 * se:.2f} points",
                f"{100 * cold:.1f}%",
            ]
        )
        csv_rows.append(
            [
                name,
                spec.key(),
                train["impressions"],
                train["ctr"],
                train["cvr_given_click"],
                train["conversions"],
                valid.get("conversions", math.nan),
                test["conversions"],
                se,
                cold,
            ]
        )
    return Table(
        "datasets",
        "The datasets: sizes, positives, precision and cold tail",
        header,
        rows,
        csv_header,
        csv_rows,
        [
            "CTR and CVR given click are the training days'. The s.e. is Hanley & McNeil's "
            "standard error of a clicked CVR AUC of 0.70 on the test split's clicks: the "
            "precision with which one model can be measured there.",
        ],
    )


def ceiling_table(
    base: Sequence[RunResult], scaled: Sequence[RunResult], variants: Sequence[str], factor: int
) -> Table:
    """Per variant: CVR AUC (clicked, entire space) on the dataset and on ``factor`` × its
    data, the oracle's AUC and the share of the gap to the oracle that the data closes."""
    header = ["model"]
    csv_header = ["model"]
    for _, where in MAP_METRICS:
        header += [f"1x ({where})", f"{factor}x", "oracle", "gap closed"]
        csv_header += [f"{where}_1x", f"{where}_{factor}x", f"{where}_oracle", f"{where}_closed"]
    by_base, by_scaled = group(base), group(scaled)
    rows, csv_rows = [], []
    oracle_of = {"cvr_auc": "oracle_cvr_auc", "entire_space_cvr_auc": "oracle_entire_space_cvr_auc"}
    for v in variants:
        row, csv_row = [v], [v]
        for metric, _ in MAP_METRICS:
            one, one_std = stat(by_base.get(v, []), metric)
            many, many_std = stat(by_scaled.get(v, []), metric)
            oracle = stat(by_scaled.get(v, []), oracle_of[metric])[0]
            closed = (many - one) / (oracle - one) if oracle - one > 0 else math.nan
            row += [
                fmt_auc(one, one_std),
                fmt_auc(many, many_std),
                fmt_auc(oracle, math.nan),
                "n/a" if math.isnan(closed) else f"{100 * closed:.0f}%",
            ]
            csv_row += [one, many, oracle, closed]
        rows.append(row)
        csv_rows.append(csv_row)
    return Table(
        "ceiling",
        f"The learnable ceiling: {factor}x the training data against the oracle",
        header,
        rows,
        csv_header,
        csv_rows,
        [
            f"gap closed = (AUC at {factor}x − AUC at 1x) / (oracle − AUC at 1x). What stays "
            "open with more data is what the model cannot learn; what closes was data-limited. "
            f"The {factor}x dataset has the same preset, population and days, {factor}x the "
            "impressions a day, so its test days are larger samples of the same distribution.",
        ],
    )


def ceiling_gain_table(
    base: Sequence[RunResult],
    scaled: Sequence[RunResult],
    variants: Sequence[str],
    factor: int,
    reference: str = "base",
) -> Table:
    """Per variant other than ``reference``: its gain over ``reference`` ± its standard error
    on the dataset and on ``factor`` × its data, per metric of :data:`MAP_METRICS`, and how the
    gain changes with the data: does a sparse-data gain hold once data are plentiful?"""
    header, csv_header = ["model"], ["model"]
    for _, where in MAP_METRICS:
        header += [f"− {reference}, 1x ({where})", f"− {reference}, {factor}x", "change"]
        csv_header += [
            f"{where}_gap_1x",
            f"{where}_gap_1x_se",
            f"{where}_gap_{factor}x",
            f"{where}_gap_{factor}x_se",
            f"{where}_change",
            f"{where}_change_se",
        ]
    by_base, by_scaled = group(base), group(scaled)
    rows, csv_rows = [], []
    for v in variants:
        if v == reference:
            continue
        row, csv_row = [v], [v]
        for metric, _ in MAP_METRICS:
            one, one_err = gap_with_error(by_base.get(reference, []), by_base.get(v, []), metric)
            many, many_err = gap_with_error(
                by_scaled.get(reference, []), by_scaled.get(v, []), metric
            )
            change, change_err = many - one, math.hypot(one_err, many_err)
            row += [fmt_gap(one, one_err), fmt_gap(many, many_err), fmt_gap(change, change_err)]
            csv_row += [one, one_err, many, many_err, change, change_err]
        rows.append(row)
        csv_rows.append(csv_row)
    return Table(
        "ceiling_gains",
        f"Gains over {reference} at 1x and at {factor}x the training data",
        header,
        rows,
        csv_header,
        csv_rows,
        [
            "Each gap is mean(model) − mean(" + reference + ") over the seeds, ± the standard "
            "error of that difference; change = the gap at "
            f"{factor}x − the gap at 1x, ± the two errors combined.",
        ],
    )


ABLATION_METRICS = (
    ("cvr_auc", "clicked CVR AUC"),
    ("ctcvr_auc", "CTCVR AUC"),
    ("entire_space_cvr_auc", "entire-space CVR AUC"),
)


def reference_ablation_table(results: Sequence[RunResult], reference: str, ours: str) -> Table:
    """Per label (torch-rechub's defaults ``reference``, each change, the project's ESMM
    ``ours``): the test-day metrics and each one's gap to ``reference`` ± its standard error,
    and the kept epoch."""
    header, csv_header = ["run"], ["run", "seeds"]
    for _, title in ABLATION_METRICS:
        header += [title, f"− {reference}"]
    for metric, _ in ABLATION_METRICS:
        csv_header += [f"{metric}_mean", f"{metric}_std", f"{metric}_gap", f"{metric}_gap_se"]
    header.append("kept epoch")
    csv_header.append("kept_epoch_mean")
    by_label = group(results)
    ref = by_label.get(reference, [])
    rows, csv_rows = [], []
    for label, runs in by_label.items():
        cells, values = _gap_cells(ref, runs, [m for m, _ in ABLATION_METRICS], label == reference)
        rows.append([label, *cells])
        csv_rows.append([label, len(runs), *values])
    return Table(
        "reference_ablation",
        "torch-rechub's ESMM, one default at a time replaced by the project's",
        header,
        rows,
        csv_header,
        csv_rows,
        [
            "Test-day metrics of each run's kept epoch (mean ± std over seeds); "
            f"− {reference}: the gap to torch-rechub with its own defaults ± its standard "
            "error, in points. A diagnostic of where two implementations of one model differ, "
            "not a choice of defaults: the epoch is still chosen on the validation day.",
        ],
    )
