"""Petastorm input: columns, shapes, sharding, and epochs that end together on uneven shards."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml

from esmm.data import (
    DataConfig,
    DataError,
    count_rows,
    eval_batches,
    partition_urls,
    train_batches,
)
from tests.feature_fixtures import small_fields, write_feature_day


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    fields = small_fields()
    write_feature_day(root, "2026-01-01", fields, rows=1000, seed=1)
    write_feature_day(root, "2026-01-02", fields, rows=600, seed=2)
    return root, fields


def test_missing_partition_is_named(table):
    root, _ = table
    with pytest.raises(DataError, match="dt=2026-03-01"):
        partition_urls(str(root), ["2026-01-01", "2026-03-01"])


def test_batches_hold_only_model_columns_with_tensor_shapes(table):
    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01"])
    cfg = DataConfig(batch_size=128, shuffle_queue_rows=500, reader_workers=1)
    with train_batches(urls, fields, cfg, seed=3) as batches:
        batch = next(iter(batches))
    assert set(batch) == {"click", "conversion", *(f.name for f in fields.fields)}
    assert batch["click"].dtype == torch.float32 and batch["click"].shape == (128,)
    bag = fields.by_name("user_recent_categories")
    assert batch[bag.name].dtype == torch.int64
    assert batch[bag.name].shape == (128, bag.max_len)
    assert batch["item_id"].shape == (128,)


def test_one_epoch_covers_every_row_once_without_sharding(table):
    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01", "2026-01-02"])
    cfg = DataConfig(batch_size=256, shuffle_queue_rows=300, reader_workers=2)
    with train_batches(urls, fields, cfg, seed=4) as batches:
        rows = sum(int(b["click"].shape[0]) for b in batches)
    assert rows == count_rows(urls) == 1600


def test_eval_shards_partition_the_rows_exactly(table):
    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01"])
    ids = [
        {
            i
            for batch in eval_batches(urls, fields, rank, 2, workers=1)
            for i in batch["impression_id"]
        }
        for rank in (0, 1)
    ]
    assert ids[0].isdisjoint(ids[1])
    assert len(ids[0]) + len(ids[1]) == 1000


def test_more_workers_than_row_groups_is_a_clear_error(table, tmp_path):
    _, fields = table
    write_feature_day(tmp_path, "2026-01-05", fields, rows=50, row_group_sizes=[50])
    urls = partition_urls(str(tmp_path), ["2026-01-05"])
    with pytest.raises(DataError, match="row group"):
        list(eval_batches(urls, fields, 1, 2, workers=1))


@pytest.mark.integration
def test_uneven_shards_end_the_epoch_together_on_every_rank(tmp_path, run_horovod):
    fields = small_fields()
    # rank 0 gets row groups 0 and 2 (1000 + 50 rows), rank 1 only row group 1 (50 rows)
    write_feature_day(tmp_path, "2026-02-01", fields, rows=1100, row_group_sizes=[1000, 50, 50])
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    result = run_horovod(
        "tests/scripts/uneven_shards.py", str(tmp_path), str(fields_file), np=2, timeout=180
    )
    assert result.returncode == 0, result.output
    steps = {r: re.search(r"rank=\d+ steps=(\d+)", result.rank_text(r)).group(1) for r in (0, 1)}
    assert steps[0] == steps[1]
    assert int(steps[0]) == 1  # the short shard has one batch of 50 rows


def test_prefetcher_yields_everything_in_order_and_reraises_source_errors():
    from esmm.data.prefetch import _Prefetcher

    with _Prefetcher(iter(range(100)), depth=3) as items:
        assert list(items) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad row group")

    with _Prefetcher(broken(), depth=2) as items, pytest.raises(ValueError, match="bad row"):
        list(items)


def test_prefetcher_stops_its_thread_when_the_consumer_leaves_early():
    import threading

    from esmm.data.prefetch import _Prefetcher

    with _Prefetcher(iter(range(10_000)), depth=2) as items:
        assert next(items) == 0
    assert not any(t.name == "esmm-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize(
    ("batch_size", "queue_rows"), [(128, 500), (64, 3000), (100, 20_000), (256, 0), (7, 0)]
)
def test_train_batches_are_petastorms_batched_loader_batches(tmp_path, batch_size, queue_rows):
    # esmm.data.shuffle assembles batches itself (fewer tensor operations per batch) with the same
    # algorithm and random draws as Petastorm's BatchedDataLoader: the same rows, same order.
    from petastorm.pytorch import BatchedDataLoader

    from contract import schema
    from esmm.data.batches import _to_tensors
    from esmm.data.reader import _make_reader

    fields = small_fields()
    write_feature_day(tmp_path, "2026-01-03", fields, 3000, row_group_sizes=[900, 700, 1400])
    urls = partition_urls(str(tmp_path), ["2026-01-03"])
    torch.manual_seed(5)
    reader = _make_reader(urls, schema.model_columns(fields), 0, 1, True, 5, 1)
    with BatchedDataLoader(
        reader, batch_size=batch_size, shuffling_queue_capacity=queue_rows
    ) as loader:
        expected = [_to_tensors(batch, fields) for batch in loader]
    cfg = DataConfig(batch_size=batch_size, shuffle_queue_rows=queue_rows, reader_workers=1)
    with train_batches(urls, fields, cfg, seed=5) as batches:
        got = list(batches)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.keys() == theirs.keys()
        for name, tensor in mine.items():
            assert tensor.dtype == theirs[name].dtype and tensor.is_contiguous()
            assert torch.equal(tensor, theirs[name]), name


def test_numeric_columns_convert_like_petastorm_and_odd_ones_are_left_to_it():
    import numpy as np
    import pyarrow as pa

    from esmm.data.reader import _numeric_column_to_numpy, _petastorm_column_to_numpy

    lists = pa.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], pa.list_(pa.int64()))
    scalars = [pa.array([3, 1, 2], pa.int32()), pa.array([0.5, 2.0], pa.float32())]
    for array in (lists, lists.slice(1, 2), *scalars, scalars[0].slice(1)):
        fast = _numeric_column_to_numpy(array)
        slow = _petastorm_column_to_numpy(pa.chunked_array([array]), pa.chunked_array([array]))
        assert fast.dtype == slow.dtype and np.array_equal(fast, slow)
    assert _numeric_column_to_numpy(lists.slice(1, 2)).tolist() == [[4, 5, 6], [7, 8, 9]]
    for odd in (
        pa.array([[1, 2], [3]]),  # ragged
        pa.array([[1, 2], None]),  # a null row
        pa.array([[1, None], [3, 4]]),  # a null value
        pa.array([["a", "b"], ["c", "d"]]),  # not numbers
        pa.array([1, None]),  # a null number (pandas makes it a float NaN)
        pa.array([True, False]),  # not numbers
    ):
        assert _numeric_column_to_numpy(odd) is None


def test_batches_from_the_input_process_equal_those_from_a_thread(table):
    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01", "2026-01-02"])
    got = {}
    for in_process in (True, False):
        cfg = DataConfig(batch_size=96, shuffle_queue_rows=400, input_process=in_process)
        with train_batches(urls, fields, cfg, seed=9) as batches:
            got[in_process] = list(batches)
    assert len(got[True]) == len(got[False]) == -(-1600 // 96)
    for mine, theirs in zip(got[True], got[False], strict=True):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_an_error_in_the_input_process_is_raised_in_the_trainer(tmp_path):
    fields = small_fields()
    day = tmp_path / "dt=2026-01-07"
    day.mkdir()
    (day / "part-0.parquet").write_bytes(b"not a parquet file")
    urls = partition_urls(str(tmp_path), ["2026-01-07"])
    with (
        train_batches(urls, fields, DataConfig()) as batches,
        pytest.raises(Exception, match=r"(?i)parquet") as raised,
    ):
        next(batches)
    assert not isinstance(raised.value, DataError)  # the reader's own error, not "exited"


def test_the_input_process_ends_when_the_consumer_leaves_early(table):
    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01"])
    with train_batches(urls, fields, DataConfig(batch_size=8), seed=1) as batches:
        next(batches)
        process = batches._process
        assert process.is_alive()
    assert not process.is_alive()


def test_an_input_process_that_dies_is_a_clear_error_not_a_hang(table):
    import signal

    root, fields = table
    urls = partition_urls(str(root), ["2026-01-01"])
    with train_batches(urls, fields, DataConfig(batch_size=8), seed=1) as batches:
        next(batches)
        os.kill(batches._process.pid, signal.SIGKILL)
        with pytest.raises(DataError, match=r"input process exited \(code -9\)"):
            list(batches)


def test_a_script_without_a_main_guard_can_train(table, tmp_path):
    # The input process must not run the caller's script again (multiprocessing re-imports
    # the main module in a forkserver child unless told otherwise).
    import subprocess
    import sys
    from pathlib import Path

    root, fields = table
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from contract.config import load_config\nfrom contract.fields import FieldsConfig\n"
        "from esmm.data import DataConfig, partition_urls, train_batches\n"
        f"fields = load_config({str(fields_file)!r}, FieldsConfig)\n"
        f"urls = partition_urls({str(root)!r}, ['2026-01-02'])\n"
        "with train_batches(urls, fields, DataConfig(batch_size=100)) as batches:\n"
        "    print('rows', sum(len(b['click']) for b in batches))\n"
    )
    project = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(project)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["rows", "600"]


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "bad footer"])
def test_a_corrupt_parquet_file_is_one_data_error_that_names_it(tmp_path, damage):
    from contract.layout import as_url

    fields = small_fields()
    write_feature_day(tmp_path, "2026-01-08", fields, rows=200, seed=3)
    day = tmp_path / "dt=2026-01-08"
    good = (day / "part-0.parquet").read_bytes()
    bad = day / "part-1.parquet"  # beside a good file of the same partition
    bad.write_bytes(
        {
            "garbage": b"not a parquet file" * 50,
            "empty": b"",
            "truncated": good[: len(good) // 2],
            "bad footer": good[:-100] + b"\xff" * 92 + good[-8:],  # length and magic intact
        }[damage]
    )
    urls = partition_urls(str(tmp_path), ["2026-01-08"])
    with pytest.raises(DataError) as raised:
        count_rows(urls)
    message = str(raised.value)
    assert message.startswith(f"{as_url(str(bad))}: not a readable Parquet file (")
    assert "\n" not in message and len(message) < len(as_url(str(bad))) + 200


def test_the_trainer_reports_a_corrupt_file_in_one_line_before_horovod(
    tmp_path, monkeypatch, capsys
):
    # (the data checks run before `import horovod.torch`: here it cannot be imported at all)
    import sys
    from pathlib import Path

    from esmm.train import main

    fields = small_fields()
    for day in ("2026-01-08", "2026-01-09"):
        write_feature_day(tmp_path, day, fields, rows=200)
    bad = tmp_path / "dt=2026-01-08" / "part-0.parquet"
    bad.write_bytes(b"not a parquet file")
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    code = main(
        [
            "--config",
            str(Path(__file__).resolve().parents[1] / "conf" / "train.yaml"),
            "--fields",
            str(fields_file),
            "--features",
            str(tmp_path),
            "--train-dates",
            "2026-01-08",
            "--eval-date",
            "2026-01-09",
        ]
    )
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("esmm.train: error: ")
    assert f"{bad}: not a readable Parquet file" in lines[0]


def test_the_forkserver_preloads_the_modules_the_input_process_runs():
    # multiprocessing skips a preload name that does not import, silently: every input
    # process would then import it itself. The child runs _produce and the batch source,
    # both unpickled by their module path.
    import importlib

    from esmm.data import batches, process

    for name in process._PRELOAD:
        importlib.import_module(name)
    assert {process._produce.__module__, batches._local_batches.__module__} <= set(process._PRELOAD)
