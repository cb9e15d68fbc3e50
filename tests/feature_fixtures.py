"""Small feature tables written directly with pyarrow, for tests of the torch side.

They follow :func:`contract.schema.arrow_schema` exactly and carry a learnable signal (click and
conversion depend on a few field ids), plus an oracle table, so the trainer can be tested
without running the Spark jobs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from contract import schema
from contract.config import load_config
from contract.fields import FieldsConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def small_fields() -> FieldsConfig:
    """The shipped field list with id spaces shrunk so test models are tiny."""
    fields = load_config(PROJECT_ROOT / "conf" / "fields.yaml", FieldsConfig)
    return FieldsConfig(
        fields=[f.model_copy(update={"num_buckets": min(f.num_buckets, 64)}) for f in fields.fields]
    )


def write_feature_day(
    root: Path,
    day: str,
    fields: FieldsConfig,
    rows: int,
    row_group_sizes: list[int] | None = None,
    seed: int = 0,
    oracle_root: Path | None = None,
) -> Path:
    """Write ``root/dt=day/part-0.parquet`` (and the oracle) with ``rows`` impressions.

    ``row_group_sizes`` sets the row groups explicitly (their sum must be ``rows``), so a
    test can make shards uneven on purpose.
    """
    rng = np.random.default_rng(seed)
    columns: dict[str, object] = {
        schema.IMPRESSION_ID: [f"{day}-{i}" for i in range(rows)],
    }
    for spec in fields.fields:
        if spec.kind == "single":
            columns[spec.name] = rng.integers(0, spec.num_buckets, rows)
        else:
            ids = rng.integers(1, spec.num_buckets, (rows, spec.max_len))
            lengths = rng.integers(0, spec.max_len + 1, rows)
            ids[np.arange(spec.max_len)[None, :] >= lengths[:, None]] = 0
            columns[spec.name] = list(ids)
    first, second = fields.fields[0].name, fields.fields[7].name
    click_logit = -1.5 + 1.5 * np.sin(np.asarray(columns[first]) * 0.7)
    cvr_logit = -1.0 + 2.0 * np.cos(np.asarray(columns[second]) * 0.9)
    pctr = 1 / (1 + np.exp(-click_logit))
    pcvr = 1 / (1 + np.exp(-cvr_logit))
    click = (rng.random(rows) < pctr).astype(np.int32)
    conversion_if_clicked = (rng.random(rows) < pcvr).astype(np.int32)
    columns[schema.CLICK] = click
    columns[schema.CONVERSION] = click * conversion_if_clicked
    table_schema = schema.arrow_schema(fields)
    table = pa.table({name: columns[name] for name in table_schema.names}, schema=table_schema)
    out = root / f"{schema.PARTITION}={day}"
    out.mkdir(parents=True, exist_ok=True)
    sizes = row_group_sizes or [max(1, rows // 4)] * 4
    with pq.ParquetWriter(out / "part-0.parquet", table_schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
        if start < rows:
            writer.write_table(table.slice(start), row_group_size=rows - start)
    if oracle_root is not None:
        oracle_dir = oracle_root / f"{schema.PARTITION}={day}"
        oracle_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "impression_id": columns[schema.IMPRESSION_ID],
                    "pctr": pctr,
                    "pcvr": pcvr,
                    "click": click,
                    "conversion_if_clicked": conversion_if_clicked,
                }
            ),
            oracle_dir / "part-0.parquet",
        )
    return out


# The three days of tests/conftest.py's ``learnable_days`` (train on the first two, evaluate
# on the third).
LEARNABLE_DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")


def write_learnable_days(root: Path) -> Path:
    """:data:`LEARNABLE_DAYS` of 6,000 rows each under ``root/features`` (labels that depend
    on the ids, so a trained model beats chance), their oracle under ``root/oracle`` and the
    field list ``root/fields.yaml``; returns that file."""
    fields = small_fields()
    for seed, day in enumerate(LEARNABLE_DAYS):
        write_feature_day(
            root / "features", day, fields, rows=6000, seed=seed, oracle_root=root / "oracle"
        )
    fields_file = root / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    return fields_file


def learnable_train_args(root: Path, fields_file: Path, *extra: str) -> list[str]:
    """The trainer's options for :func:`write_learnable_days`' table at ``root``: the shipped
    train config, 2 epochs on the first two days, the third evaluated with the oracle; then
    ``extra``. The multi-host test trains with these as tests/conftest.py's
    ``localhost_training`` does, so that their metrics must agree."""
    from contract import commands

    return [
        *commands.train_args(
            PROJECT_ROOT / "conf" / "train.yaml",
            root / "features",
            f"{LEARNABLE_DAYS[0]}..{LEARNABLE_DAYS[1]}",
            LEARNABLE_DAYS[2],
            fields=fields_file,
            oracle=root / "oracle",
            no_progress=True,
            sets=["epochs=2"],
        ),
        *extra,
    ]


def register_untrained_model(
    tracking_uri: str, name: str, fields: FieldsConfig, seed: int = 0, eval_date: str = "x"
) -> str:
    """Log and register an (untrained) ESMM pyfunc the way the trainer does; its version."""
    import mlflow
    import torch

    from esmm.model import build_model
    from esmm.tracking import RunTracker, TrackingConfig
    from esmm.train import TrainConfig

    tracking = TrackingConfig(
        tracking_uri=tracking_uri, experiment="scoring-tests", registered_model_name=name
    )
    cfg = TrainConfig(tracking=tracking)
    torch.manual_seed(seed)
    model = build_model(fields, cfg.model)
    rng = np.random.default_rng(seed)
    example = {}
    for spec in fields.fields:
        shape = (3,) if spec.kind == "single" else (3, spec.max_len)
        example[spec.name] = rng.integers(1, spec.num_buckets, shape)
    arrays = {
        "click": np.array([1.0, 0.0, 1.0, 0.0]),
        "conversion": np.array([1.0, 0.0, 0.0, 0.0]),
        **{k: np.array([0.4, 0.3, 0.2, 0.1]) for k in ("pctr", "pcvr", "pctcvr")},
    }
    mlflow.set_tracking_uri(tracking_uri)
    tracker = RunTracker.open(tracking, run_name=f"{name}-{seed}")
    return tracker.log_model_and_finish(
        model, cfg, fields, {}, arrays, example, train_dates="x", eval_date=eval_date
    )
