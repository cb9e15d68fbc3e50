"""Fetch the wheels that bench/device_check.sh installs on a GPU machine without network.

    .venv/bin/python -m bench.device_wheels [--dest .whl] [--python-version 3.12]

The GPU machine has Python 3.12 with a CUDA torch, numpy 2, a recent pyarrow and pandas, but
no petastorm or pydantic. Petastorm 0.12.1 needs pyarrow 14 (the legacy ParquetDataset API),
and pyarrow 14 is built against numpy 1.x, so this project's pins travel with the check:
pyarrow, numpy, pandas (the pandas there may not accept numpy 1.x or pyarrow 14), petastorm
and what it imports, and pydantic. The carried tree plus the working tree must stay under the
device tool's 64 MiB, so the big wheels are slimmed of what the benchmark never loads (tests,
C headers and sources, Arrow Flight, Substrait); their RECORD files are rewritten to match.
Add ``/.whl/`` to .git/info/exclude so that the wheels are never committed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# name==version as in .venv (pyproject.toml pins the first four).
WHEELS = [
    "pyarrow==14.0.2",
    "numpy==1.26.4",
    "pandas==2.2.3",
    "petastorm==0.12.1",
    "pytz==2026.6",  # pandas 2.2 imports it; pandas 3 (on the device) no longer needs it
    "pyzmq==27.3.0",  # petastorm.reader imports its process pool, which imports zmq
    "diskcache==5.6.3",
    "dill==0.4.1",
    "future==1.0.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated_types==0.8.0",
    "typing_inspection==0.4.5",
    "typing_extensions==4.16.0",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "any",
]
# Members never loaded by `import pyarrow / pandas / numpy` or by the benchmark.
DROP = re.compile(
    r"^(pyarrow/(include|src|tests)/"
    r"|pyarrow/.*\.(pyx|pxd|pxi|h|cc)$"
    r"|pyarrow/[^/]*(flight|substrait)[^/]*$"
    r"|pandas/tests/"
    r"|numpy/(.+/)?tests/)"
)


def slim(wheel: Path) -> int:
    """Rewrite ``wheel`` without the DROP members; return the bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if DROP.match(i.filename)}
        if not dropped:
            tmp.unlink()
            return 0
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",")[0] not in dropped).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for spec in WHEELS:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(w.name.lower().startswith(name + "-") for w in args.dest.glob("*.whl")):
            continue
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        target = ["--python-version", args.python_version, "--implementation", "cp", *platforms]
        subprocess.run([*pip, *target, "-d", str(args.dest), spec], check=True)
    for wheel in sorted(args.dest.glob("*.whl")):
        saved = slim(wheel)
        if saved:
            print(f"slimmed {wheel.name}: -{saved / 2**20:.1f} MiB")
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB in {len(list(args.dest.glob('*.whl')))} wheels")


if __name__ == "__main__":
    main()
