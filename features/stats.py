"""Accounting of the feature jobs: counts per log, label rates, null rates, checks.

The stats file ``<out>/_stats/dt=P.json`` of a partition holds, per log (or raw file),
``input`` (records the build owns), ``output``, ``quarantined`` (total and ``quarantined_by``
reason), ``deduplicated`` (total and ``deduplicated_by`` reason), ``unclassified``, plus the
table's label rates and the share of id 0 per field. :func:`conservation_problems` is the
check both jobs fail on (through :func:`features.publish.stage_and_publish`); which log's
output the table's counts must equal is its ``table_outputs`` argument.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from contract.fields import FieldsConfig
from contract.schema import CLICK, CONVERSION
from features.transforms import (
    DEDUPLICATED,
    IMPRESSION_QUARANTINE_REASONS,
    OUTPUT,
    QUARANTINED,
    Reason,
)

__all__ = [
    "DAILY_TABLE_OUTPUTS",
    "conservation_problems",
    "event_log_counts",
    "impression_counts",
    "impression_metrics",
    "log_counts",
    "table_metrics",
    "table_stats",
]


# The daily table: one row per output impression, one clicked row per output click, one
# converted row per output conversion (log → the table's count that its output must equal).
DAILY_TABLE_OUTPUTS = {"impressions": "rows", "clicks": "clicks", "conversions": "conversions"}


def log_counts(
    input_rows: int, by_status_reason: list[tuple[str | None, str | None, int]]
) -> dict[str, Any]:
    """One log's counts from ``input_rows`` and ``(status, reason, records)`` triples: the
    ``output``, ``quarantined`` / ``quarantined_by``, ``deduplicated`` / ``deduplicated_by``
    totals, and ``unclassified`` (records of no known status)."""
    quarantined: Counter[str] = Counter()
    deduplicated: Counter[str] = Counter()
    output = unclassified = 0
    for status, reason, n in by_status_reason:
        if status == OUTPUT:
            output += n
        elif status == QUARANTINED:
            quarantined[str(reason)] += n
        elif status == DEDUPLICATED:
            deduplicated[str(reason)] += n
        else:
            unclassified += n
    return {
        "input": input_rows,
        "output": output,
        "quarantined": sum(quarantined.values()),
        "quarantined_by": dict(sorted(quarantined.items())),
        "deduplicated": sum(deduplicated.values()),
        "deduplicated_by": dict(sorted(deduplicated.items())),
        "unclassified": unclassified,
    }


def event_log_counts(logs: Mapping[str, DataFrame]) -> dict[str, dict[str, Any]]:
    """Counts of click / conversion logs from their classified records (owned ones only), in
    one Spark job for all of ``logs`` (``{log: records}``).

    ``input`` is counted from ``owned`` alone, independently of the statuses, so that a
    record that lost its status makes the conservation check fail.
    """
    tagged = [
        records.select(F.lit(log).alias("_log"), "owned", "status", "reason")
        for log, records in logs.items()
    ]
    union = tagged[0]
    for frame in tagged[1:]:
        union = union.unionByName(frame)
    rows = union.groupBy("_log", "owned", "status", "reason").count().collect()
    counts = {}
    for log in logs:
        mine = [r for r in rows if r["_log"] == log]
        input_rows = sum(r["count"] for r in mine if r["owned"])
        by_status = [(r["status"], r["reason"], r["count"]) for r in mine if r["owned"]]
        counts[log] = log_counts(input_rows, by_status)
        counts[log]["read_not_owned"] = sum(r["count"] for r in mine if not r["owned"])
    return counts


def impression_metrics() -> list[Column]:
    """Aggregates over :func:`features.transforms.rank_impressions`' rows that
    :func:`impression_counts` turns into the log's counts (for ``DataFrame.observe``)."""

    def rows(condition: Column) -> Column:
        return F.sum(condition.cast("long"))

    return [
        F.count(F.lit(1)).alias("records"),
        rows(F.col("copy") == 1).alias("output"),
        rows(F.col("copy") > 1).alias("deduplicated"),
        *[
            rows(F.col("reason") == reason).alias(reason)
            for reason in IMPRESSION_QUARANTINE_REASONS
        ],
    ]


def impression_counts(metrics: dict[str, Any], lines: int, blank_lines: int = 0) -> dict[str, Any]:
    """Counts of the impressions log from :func:`impression_metrics`' values, over records
    read without the blank lines, which are added (as malformed) from ``blank_lines``.

    ``input`` is the number of lines in the day's files, counted apart from the parsing, so a
    line the parser dropped or split makes the conservation check fail; ``records`` is what
    the parser returned. ``output`` is the number of distinct valid ids; the table's row
    count is checked against it by :func:`conservation_problems`.
    """
    metrics = {**metrics, "records": metrics["records"] + blank_lines}
    metrics[Reason.MALFORMED] = (metrics[Reason.MALFORMED] or 0) + blank_lines
    by_status = [
        (OUTPUT, None, metrics["output"] or 0),
        (DEDUPLICATED, Reason.DUPLICATE_EVENT, metrics["deduplicated"] or 0),
    ]
    by_status += [
        (QUARANTINED, reason, metrics[reason] or 0)
        for reason in IMPRESSION_QUARANTINE_REASONS
        if metrics[reason]
    ]
    counts = log_counts(lines, by_status)
    counts["records"] = metrics["records"]
    counts["unclassified"] = metrics["records"] - sum(n for _, _, n in by_status)
    return counts


def table_metrics(fields: FieldsConfig) -> list[Column]:
    """Aggregates over the feature table that :func:`table_stats` reads (for
    ``DataFrame.observe``): rows, label sums and the share of id 0 per field."""
    aggregates = [
        F.count(F.lit(1)).alias("rows"),
        F.sum(CLICK).alias("clicks"),
        F.sum(CONVERSION).alias("conversions"),
        F.sum(((F.col(CONVERSION) == 1) & (F.col(CLICK) == 0)).cast("int")).alias(
            "conversion_without_click"
        ),
    ]
    for spec in fields.fields:
        if spec.kind == "multi":
            empty = F.coalesce(F.array_max(spec.name), F.lit(0)) == 0  # ids are >= 0
        else:
            empty = F.col(spec.name) == 0
        aggregates.append(F.avg(empty.cast("double")).alias(spec.name))
    return aggregates


def table_stats(row: dict[str, Any], fields: FieldsConfig) -> dict[str, Any]:
    """Rows, label rates (CTR, CVR, CTCVR) and the share of id 0 per field, from the values
    of :func:`table_metrics`."""
    rows, clicks, conversions = row["rows"], row["clicks"] or 0, row["conversions"] or 0
    return {
        "rows": rows,
        "clicks": clicks,
        "conversions": conversions,
        "conversion_without_click": row["conversion_without_click"] or 0,
        "ctr": clicks / rows if rows else 0.0,
        "cvr": conversions / clicks if clicks else 0.0,
        "ctcvr": conversions / rows if rows else 0.0,
        "null_rate": {spec.name: row[spec.name] or 0.0 for spec in fields.fields},
    }


def conservation_problems(
    stats: dict[str, Any], table_outputs: Mapping[str, str] = DAILY_TABLE_OUTPUTS
) -> list[str]:
    """Every violated accounting rule of a partition's stats, as messages (empty when all hold).

    Rules: per log, input = output + quarantined + deduplicated and nothing unclassified; for
    each ``log: count`` of ``table_outputs``, the log's output equals that count of the table
    (the daily job, :data:`DAILY_TABLE_OUTPUTS`: one row per output impression, one click
    output per clicked row, one conversion output per converted row; the Ali-CCP ingest: one
    row per skeleton output); no conversion without a click.
    """
    problems = []
    for log, counts in stats["logs"].items():
        accounted = counts["output"] + counts["quarantined"] + counts["deduplicated"]
        unclassified = counts.get("unclassified", 0)
        if counts["input"] != accounted or unclassified:
            problems.append(
                f"{log}: input {counts['input']} != output {counts['output']} + quarantined "
                f"{counts['quarantined']} + deduplicated {counts['deduplicated']} "
                f"({unclassified} unclassified)"
            )
    table = stats["table"]
    for log, count in table_outputs.items():
        output, rows = stats["logs"][log]["output"], table[count]
        if output != rows:
            problems.append(f"{log}: output {output} != {rows} in the table")
    if table["conversion_without_click"]:
        problems.append(
            f"{table['conversion_without_click']} rows have a conversion without a click"
        )
    return problems
