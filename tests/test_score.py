"""Batch scoring (jobs/score.py, features/scoring.py) with a registered model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from contract import commands, schema
from tests.feature_fixtures import register_untrained_model, small_fields, write_feature_day
from tests.helpers import VENV_BIN, post_json, run_command, sqlite_store, start_model_server

DAY = "2026-01-03"


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory):
    """A feature day, a tracking store with model 'scorer' (alias champion → version 1)."""
    import mlflow

    root = tmp_path_factory.mktemp("scoring")
    fields = small_fields()
    write_feature_day(root / "features", DAY, fields, rows=500, seed=3)
    uri = sqlite_store(root / "mlflow.db")
    version = register_untrained_model(uri, "scorer", fields)
    mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias("scorer", "champion", version)
    return root, uri, version


def score_args(root, model: str, features=None) -> list[str]:
    return commands.score_args(features or root / "features", DAY, model, root / "predictions")


@pytest.fixture(scope="module")
def batch_scored(scoring_setup):
    """The batch scorer's run over the day (spark-submit jobs/score.py), once per module."""
    root, uri, _ = scoring_setup
    command = commands.spark_job(VENV_BIN, "score", score_args(root, "models:/scorer@champion"))
    return run_command(command, env={"MLFLOW_TRACKING_URI": uri}, timeout=300)


@pytest.mark.integration
def test_scoring_gives_one_row_per_impression_with_consistent_probabilities(
    scoring_setup, batch_scored
):
    root, _, version = scoring_setup
    result = batch_scored
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"scored with models:/scorer/{version}" in result.stdout
    predictions = pq.read_table(root / "predictions" / f"dt={DAY}").to_pandas()
    features = pq.read_table(root / "features" / f"dt={DAY}").to_pandas()
    assert len(predictions) == len(features) == 500
    assert sorted(predictions[schema.IMPRESSION_ID]) == sorted(features[schema.IMPRESSION_ID])
    for name in ("pctr", "pcvr", "pctcvr"):
        assert predictions[name].between(0, 1).all(), name
    np.testing.assert_allclose(
        predictions["pctcvr"], predictions["pctr"] * predictions["pcvr"], rtol=1e-6
    )
    assert set(predictions["model_version"]) == {version}
    assert set(predictions["model_name"]) == {"scorer"}
    assert not list((root / "predictions" / "_tmp").glob("*"))  # staging cleaned up


def feature_records(frame, fields) -> list[dict]:
    """Feature-table rows as a client sends them: one JSON object per impression, ids as
    ints, multi-valued fields as lists."""
    names = [f.name for f in fields.fields]
    return [
        {n: [int(v) for v in row[n]] if hasattr(row[n], "__len__") else int(row[n]) for n in names}
        for row in frame[names].to_dict("records")
    ]


@pytest.mark.integration
def test_the_served_model_answers_as_the_batch_scorer_and_rejects_bad_rows_with_a_400(
    scoring_setup, batch_scored, tmp_path
):
    """``mlflow models serve -m models:/scorer@champion --env-manager local`` on 127.0.0.1:
    feature rows in, pCTR/pCVR/pCTCVR out, equal to the batch scorer's for the same rows."""
    root, uri, _ = scoring_setup
    assert batch_scored.returncode == 0, batch_scored.stderr[-3000:]
    features = pq.read_table(root / "features" / f"dt={DAY}").to_pandas().head(40)
    batch = pq.read_table(root / "predictions" / f"dt={DAY}").to_pandas()
    batch = batch.set_index(schema.IMPRESSION_ID).loc[features[schema.IMPRESSION_ID]]
    records = feature_records(features, small_fields())
    with start_model_server("models:/scorer@champion", uri, tmp_path) as url:
        status, answer = post_json(f"{url}/invocations", {"dataframe_records": records})
        assert status == 200, answer
        served = answer["predictions"]
        assert len(served) == len(records)
        for name in ("pctr", "pcvr", "pctcvr"):
            values = np.array([row[name] for row in served])
            np.testing.assert_allclose(values, batch[name].to_numpy(), rtol=1e-6, err_msg=name)
        pctr, pcvr, pctcvr = (np.array([r[k] for r in served]) for k in ("pctr", "pcvr", "pctcvr"))
        np.testing.assert_allclose(pctcvr, pctr * pcvr, rtol=1e-6)

        def rejected(rows) -> str:
            status, answer = post_json(f"{url}/invocations", {"dataframe_records": rows})
            assert 400 <= status < 500, (status, answer)
            return answer["message"]

        without = [{k: v for k, v in r.items() if k != "item_id"} for r in records[:3]]
        assert "item_id" in rejected(without)
        assert "item_id" in rejected([{**records[0], "item_id": "abc"}])
        message = rejected([{**records[0], "user_recent_shops": [1, 2]}])
        assert "field 'user_recent_shops': row 0 has 2 ids, needs exactly 8" in message
        assert "outside [0, 64)" in rejected([{**records[0], "user_id": 10**6}])


def _main_exit(capsys, root, uri, model: str, features=None) -> tuple[int, str, str]:
    """``jobs/score.py``'s ``main`` in-process: these errors come before Spark starts."""
    from jobs import score

    argv = [*score_args(root, model, features), "--tracking-uri", uri]
    with pytest.raises(SystemExit) as exited:
        score.main(argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_missing_alias_fails_in_one_line_before_spark(scoring_setup, capsys):
    root, uri, _ = scoring_setup
    code, stdout, stderr = _main_exit(capsys, root, uri, "models:/scorer@nonexistent")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("score.py: error:")
    assert "no alias 'nonexistent'" in lines[0]
    assert "Spark" not in stdout + stderr


def test_missing_model_fails_in_one_line(scoring_setup, capsys):
    root, uri, _ = scoring_setup
    code, _, stderr = _main_exit(capsys, root, uri, "models:/nobody/1")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "nobody" in stderr


def test_table_that_does_not_match_the_signature_fails_with_exit_2(scoring_setup, tmp_path, capsys):
    root, uri, _ = scoring_setup
    table = pq.read_table(root / "features" / f"dt={DAY}")
    # a table without one of the model's fields and with another one's type changed
    table = table.drop(["device"])
    table = table.set_column(
        table.schema.get_field_index("hour"), "hour", table["hour"].cast("string")
    )
    (tmp_path / f"dt={DAY}").mkdir()
    pq.write_table(table, tmp_path / f"dt={DAY}" / "part-0.parquet")
    code, _, stderr = _main_exit(capsys, root, uri, "models:/scorer@champion", features=tmp_path)
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert "column 'device' is missing" in line
    assert "column 'hour' is string, the model expects long" in line


def test_bad_model_uri_is_a_usage_error():
    from features.scoring import ScoringInputError, parse_model_uri

    assert parse_model_uri("models:/esmm@champion") == ("esmm", "champion", None)
    assert parse_model_uri("models:/esmm/7") == ("esmm", None, "7")
    with pytest.raises(ScoringInputError, match="models:/NAME@ALIAS"):
        parse_model_uri("runs:/abc/model")
