"""The epoch rule: a run keeps the epoch that is best on the validation day, and the test day
takes no part in the choice (it is read once, after the loop, with the kept weights)."""

from __future__ import annotations

import hashlib
import math

import mlflow
import pytest
import yaml

from esmm.selection import EpochRule, SelectionConfig
from tests.feature_fixtures import small_fields, write_feature_day
from tests.helpers import sqlite_store


def _run(rule: EpochRule, values: list[float], metric: str = "cvr_auc") -> list[bool]:
    return [rule.update(epoch, {metric: v}) for epoch, v in enumerate(values)]


def test_the_best_validation_epoch_is_kept_and_a_tie_keeps_the_earlier():
    rule = EpochRule(SelectionConfig(patience=0))
    assert _run(rule, [0.60, 0.70, 0.70, 0.65]) == [True, True, False, False]
    assert (rule.best_epoch, rule.best_value, rule.should_stop) == (1, 0.70, False)


def test_patience_stops_after_that_many_epochs_without_a_better_one():
    rule = EpochRule(SelectionConfig(patience=2))
    _run(rule, [0.60, 0.70, 0.69])
    assert not rule.should_stop
    rule.update(3, {"cvr_auc": 0.68})
    assert rule.should_stop and rule.best_epoch == 1
    never = EpochRule(SelectionConfig(patience=0))
    _run(never, [0.7, 0.6, 0.5, 0.4])
    assert not never.should_stop


def test_min_delta_lower_is_better_and_non_finite_values():
    rule = EpochRule(SelectionConfig(min_delta=0.01, patience=0))
    assert _run(rule, [0.700, 0.705, 0.720]) == [True, False, True]
    loss = EpochRule(SelectionConfig(metric="ctcvr_logloss", higher_is_better=False))
    assert _run(loss, [0.30, 0.25, 0.26], "ctcvr_logloss") == [True, True, False]
    nan_first = EpochRule(SelectionConfig(patience=0))
    assert _run(nan_first, [math.nan, 0.55, math.nan]) == [False, True, False]
    assert nan_first.best_epoch == 1


def test_an_unknown_metric_names_the_known_ones_and_the_state_round_trips():
    rule = EpochRule(SelectionConfig(metric="cvr_acu"))
    with pytest.raises(KeyError, match=r"selection\.metric 'cvr_acu'.*known: ctr_auc, cvr_auc"):
        rule.update(0, {"cvr_auc": 0.7, "ctr_auc": 0.6})
    rule = EpochRule(SelectionConfig(patience=3))
    _run(rule, [0.6, 0.7, 0.65])
    again = EpochRule(SelectionConfig(patience=3), rule.state())
    assert again.state() == rule.state() and again.best_metrics == {"cvr_auc": 0.7}
    assert again.update(3, {"cvr_auc": 0.66}) is False and again.stale == 2


def _weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _step(metric) -> int:
    return metric.step


@pytest.mark.integration
def test_the_trainer_chooses_by_validation_and_reads_the_test_day_once_with_the_kept_weights(
    tmp_path, monkeypatch
):
    """In-process (Horovod with one rank): every evaluation the trainer makes is recorded with
    the partition it read and a digest of the weights it used. The validation day's cvr_auc
    is scripted (0.60, 0.80, 0.70, 0.65, ...) so that the rule's answer is known: keep epoch
    2, and with patience 2 stop after epoch 4 of up to 6."""
    from esmm import train

    fields = small_fields()
    features = tmp_path / "features"
    days = {"train": "2026-01-01", "valid": "2026-01-02", "test": "2026-01-03"}
    for seed, day in enumerate(days.values()):
        write_feature_day(features, day, fields, rows=3000, seed=seed)
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))

    evaluations: list[tuple[str, str]] = []
    real_evaluate = train.evaluate

    def recording_evaluate(model, urls, *args, **kwargs):
        (url,) = urls
        evaluations.append((url.rsplit("dt=", 1)[1], _weights_digest(model)))
        return real_evaluate(model, urls, *args, **kwargs)

    scripted = iter([0.60, 0.80, 0.70, 0.65, 0.90, 0.95])
    real_metrics = train.evaluate_predictions

    def scripted_metrics(arrays):
        metrics = real_metrics(arrays)
        if evaluations[-1][0] == days["valid"]:
            metrics["cvr_auc"] = next(scripted)
        return metrics

    monkeypatch.setattr(train, "evaluate", recording_evaluate)
    monkeypatch.setattr(train, "evaluate_predictions", scripted_metrics)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path / "mlflow.db")
    previous_uri = mlflow.get_tracking_uri()
    summary = tmp_path / "summary.json"
    try:
        code = train.main(
            [
                *("--features", str(features), "--fields", str(fields_file)),
                *("--train-dates", days["train"], "--valid-date", days["valid"]),
                *("--eval-date", days["test"], "--checkpoint-dir", str(tmp_path / "ckpt")),
                *("--no-progress", "--summary-json", str(summary)),
                *("--set", "epochs=6", "--set", "selection.patience=2"),
                *("--set", "optim.lr=0.01", "--set", "optim.sparse_lr=0.1"),
                *("--set", "data.batch_size=128", "--set", "data.input_process=false"),
                *("--set", f"tracking.tracking_uri={uri}", "--set", "tracking.log_model=false"),
                *("--set", "tracking.registered_model_name=null"),
            ]
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert code == 0

    # Four validation evaluations (early stop), then the test day exactly once, last.
    assert [day for day, _ in evaluations] == [days["valid"]] * 4 + [days["test"]]
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "valid_cvr_auc"), key=_step)
    assert [(m.step, m.value) for m in history] == [(1, 0.60), (2, 0.80), (3, 0.70), (4, 0.65)]
    assert run.data.metrics["kept_epoch"] == 2
    assert run.data.metrics["epochs_trained"] == 4
    # ... and carries that epoch's validation metrics (what settings are compared on)
    assert run.data.metrics["kept_valid_cvr_auc"] == 0.80
    kept_valid = {k for k in run.data.metrics if k.startswith("kept_valid_")}
    assert {"kept_valid_ctr_auc", "kept_valid_ctcvr_auc", "kept_valid_cvr_logloss"} <= kept_valid
    assert run.data.tags["valid_date"] == days["valid"]
    # The test day was scored with the kept epoch's weights, not the last epoch's.
    weights = [digest for _, digest in evaluations]
    assert weights[-1] == weights[1] and weights[-1] != weights[3]
    assert len(set(weights[:4])) == 4  # every epoch changed the weights
    # Its metrics are the real ones (unscripted), reported once, at the kept epoch's step.
    (test_cvr_auc,) = client.get_metric_history(run.info.run_id, "cvr_auc")
    assert test_cvr_auc.step == 2 and test_cvr_auc.value not in {0.60, 0.80, 0.70, 0.65}
    assert "valid_cvr_auc" in run.data.metrics


def test_overlapping_train_validation_and_test_partitions_are_refused(tmp_path, capsys):
    from esmm import train

    fields = small_fields()
    for seed, day in enumerate(("2026-01-01", "2026-01-02", "2026-01-03")):
        write_feature_day(tmp_path / "features", day, fields, rows=100, seed=seed)
    base = ["--features", str(tmp_path / "features"), "--train-dates", "2026-01-01"]
    cases = {
        "--train-dates and --valid-date share 2026-01-01": ["--valid-date", "2026-01-01"],
        "--valid-date and --eval-date share 2026-01-02": ["--valid-date", "2026-01-02"],
        "selection.metric 'entire_space_cvr_auc' is not a validation metric without --oracle": [
            *("--valid-date", "2026-01-02", "--set", "selection.metric=entire_space_cvr_auc"),
        ],
    }
    for message, extra in cases.items():
        test_day = "2026-01-03" if "selection.metric" in message else "2026-01-02"
        assert train.main([*base, *extra, "--eval-date", test_day]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("esmm.train: error:") and message in line, line
