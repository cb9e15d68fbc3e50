"""The one config loader: typed objects, and one clear error naming the file and the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contract.config import ConfigError, load_config, parse_overrides
from contract.fields import FieldsConfig
from tests.helpers import PROJECT_ROOT, run_command


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_field_list_loads_as_typed_objects():
    fields = load_config(PROJECT_ROOT / "conf" / "fields.yaml", FieldsConfig)
    assert fields.by_name("user_recent_categories").kind == "multi"
    assert fields.by_name("user_recent_categories").max_len == 8
    assert fields.by_name("item_id").max_len is None


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = write(
        tmp_path,
        "fields:\n  - {name: a, kind: single, source: x.a, num_buckets: 4, colour: red}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, FieldsConfig)
    assert str(path) in str(info.value)
    assert "fields.0.colour: unknown key" in str(info.value)


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    path = write(tmp_path, "fields:\n  - {name: a, kind: single, source: x.a, num_buckets: many}\n")
    with pytest.raises(ConfigError, match=r"fields\.0\.num_buckets: .*'many'"):
        load_config(path, FieldsConfig)


def test_missing_required_key_is_named(tmp_path):
    path = write(tmp_path, "fields:\n  - {name: a, source: x.a, num_buckets: 4}\n")
    with pytest.raises(ConfigError, match=r"fields\.0\.kind: required key is missing"):
        load_config(path, FieldsConfig)


def test_multi_valued_field_without_max_len_is_rejected(tmp_path):
    path = write(tmp_path, "fields:\n  - {name: a, kind: multi, source: x.a, num_buckets: 4}\n")
    with pytest.raises(ConfigError, match="multi-valued and needs max_len"):
        load_config(path, FieldsConfig)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", FieldsConfig)


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "fields: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_config(path, FieldsConfig)


def test_overrides_are_typed_like_yaml_and_validated():
    assert parse_overrides(["a.b=0.5", "a.c=[1, 0, 1]", "d=true"]) == {
        "a": {"b": 0.5, "c": [1, 0, 1]},
        "d": True,
    }
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["novalue"])


def test_override_of_unknown_key_is_rejected(tmp_path):
    path = write(tmp_path, "fields:\n  - {name: a, kind: single, source: x.a, num_buckets: 4}\n")
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        load_config(path, FieldsConfig, ["bogus=1"])


def test_trainer_with_bad_config_prints_one_line_and_no_traceback(tmp_path):
    bad = write(tmp_path, "epochs: 2\nmodel:\n  variant: esmm\n  embeding_dim: 18\n", "train.yaml")
    result = run_command(
        [
            sys.executable,
            "-m",
            "esmm.train",
            "--config",
            str(bad),
            "--features",
            str(tmp_path),
            "--train-dates",
            "2026-01-01",
            "--eval-date",
            "2026-01-02",
        ],
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}: invalid TrainConfig" in result.stderr
    assert "model.embeding_dim: unknown key" in result.stderr


# Runs the trainer where horovod cannot be imported: a config error must be reported before
# the trainer needs Horovod (only rank 0 prints; the rank comes from horovodrun's variables).
_WITHOUT_HOROVOD = (
    "import runpy, sys; sys.modules['horovod'] = sys.modules['horovod.torch'] = None; "
    "sys.argv = ['esmm.train', *sys.argv[1:]]; "
    "runpy.run_module('esmm.train', run_name='__main__', alter_sys=True)"
)


@pytest.mark.parametrize(
    ("rank_env", "prints"),
    [({}, True), ({"HOROVOD_RANK": "1"}, False), ({"OMPI_COMM_WORLD_RANK": "1"}, False)],
)
def test_trainer_reports_a_config_typo_before_it_needs_horovod(tmp_path, rank_env, prints):
    bad = write(tmp_path, "epochs: 1\nmodel:\n  embeding_dim: 18\n", "train.yaml")
    args = ["--config", str(bad), "--features", str(tmp_path)]
    args += ["--train-dates", "2026-01-01", "--eval-date", "2026-01-02"]
    result = run_command([sys.executable, "-c", _WITHOUT_HOROVOD, *args], env=rank_env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    if not prints:
        assert result.stderr == ""
        return
    assert "Traceback" not in result.stderr
    first, *rest = result.stderr.splitlines()
    assert first == f"esmm.train: error: {bad}: invalid TrainConfig:"
    assert rest == ["  model.embeding_dim: unknown key"]
