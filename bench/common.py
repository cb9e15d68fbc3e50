"""Shared bits of the benchmarks: a synthetic feature table of a given size, timing, tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from contract.config import load_config
from contract.fields import FieldsConfig
from tests.feature_fixtures import write_feature_day

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shipped_fields() -> FieldsConfig:
    """The real field list (full id spaces), so models have production-sized tables."""
    return load_config(PROJECT_ROOT / "conf" / "fields.yaml", FieldsConfig)


def make_table(
    root: Path, rows: int, days: int = 1, rows_per_group: int = 32_768, seed: int = 0
) -> list[str]:
    """Write ``days`` feature partitions of ``rows`` rows each; return the day names."""
    fields = shipped_fields()
    names = []
    for day in range(days):
        name = f"2026-03-{day + 1:02d}"
        groups = [rows_per_group] * (rows // rows_per_group)
        if rows % rows_per_group:
            groups.append(rows % rows_per_group)
        write_feature_day(root, name, fields, rows, row_group_sizes=groups, seed=seed + day)
        names.append(name)
    return names


def best_of(repeats: int, run: Callable[[], float]) -> float:
    """The best of ``repeats`` runs of ``run`` (which returns seconds): noise only adds time."""
    return min(run() for _ in range(repeats))


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A small aligned text table."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
