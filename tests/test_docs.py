"""The docs match the code: every file path and every ``python -m`` module the README, the
docs, the configs and the packaging cite exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CITING = [
    PROJECT_ROOT / "README.md",
    PROJECT_ROOT / "pyproject.toml",
    PROJECT_ROOT / "Makefile",
    *sorted((PROJECT_ROOT / "docs").glob("*.md")),
    *sorted((PROJECT_ROOT / "conf").glob("*.yaml")),
]
TOP = "airflow_dags|bench|conf|contract|docs|esmm|experiments|features|jobs|scripts|tests"
PATH = re.compile(rf"(?<![\w/.-])((?:{TOP})/[\w/.-]*\w\.(?:md|py|yaml|sh|json))")
MODULE = re.compile(r"python -m ([a-z_][\w.]*)")
# Paths that name something the pipeline writes, not a file of the repository.
GENERATED = ("docs/results/",)


def _cited(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted(
        {
            (path.relative_to(PROJECT_ROOT).as_posix(), match)
            for path in CITING
            for match in pattern.findall(path.read_text())
        }
    )


@pytest.mark.parametrize(("doc", "cited"), _cited(PATH))
def test_every_cited_file_exists(doc, cited):
    if cited.startswith(GENERATED):
        pytest.skip("written by a run, not shipped")
    assert (PROJECT_ROOT / cited).exists(), f"{doc} cites {cited}, which does not exist"


@pytest.mark.parametrize(("doc", "module"), _cited(MODULE))
def test_every_cited_module_can_be_run(doc, module):
    assert importlib.util.find_spec(module) is not None, (
        f"{doc} cites python -m {module}, which does not exist"
    )
