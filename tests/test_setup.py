"""Set-up scripts: missing prerequisites are one clear line; a second `make` rebuilds nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

CHECK = str(PROJECT_ROOT / "scripts" / "check_prereqs.sh")


def check(mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHECK, mode], env={**os.environ, **env}, capture_output=True, text=True, check=False
    )


def test_this_machine_has_the_runtime_and_build_prerequisites():
    assert check("runtime").returncode == 0
    build = check("build")
    assert build.returncode == 0, build.stderr
    assert Path(build.stdout.strip()).name == "cmake"


def test_missing_java_says_what_to_install():
    result = check("runtime", JAVA_HOME="/nonexistent-jdk")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0  # one line
    assert "java not found at /nonexistent-jdk/bin/java" in result.stderr
    assert "apt-get install openjdk-17-jdk-headless" in result.stderr


def test_missing_compiler_says_what_to_install():
    result = check("build", CXX="/nonexistent/g++")
    assert result.returncode == 1
    assert "C++ compiler '/nonexistent/g++' not found" in result.stderr
    assert "apt-get install g++" in result.stderr


def test_cmake_4_is_refused_with_the_reason(tmp_path):
    fake = tmp_path / "cmake"
    fake.write_text("#!/bin/sh\necho 'cmake version 4.1.2'\n")
    fake.chmod(0o755)
    result = check("build", CMAKE=str(fake))
    assert result.returncode == 1
    assert "needs cmake 3.x" in result.stderr


def test_missing_cmake_says_what_to_install():
    result = check("build", CMAKE="/nonexistent/cmake")
    assert result.returncode == 1
    assert "apt-get install cmake" in result.stderr


@pytest.mark.skipif(
    not (PROJECT_ROOT / ".venv" / ".installed").exists(), reason="environment built elsewhere"
)
def test_second_make_venv_has_nothing_to_do():
    # `make -q` exits 0 only when the target is up to date, i.e. a rerun would rebuild nothing
    result = subprocess.run(
        ["make", "-q", "venv"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
