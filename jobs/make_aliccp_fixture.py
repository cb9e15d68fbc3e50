"""Write a small Ali-CCP raw dataset (the four .csv files) for tests and demos.

    .venv/bin/python jobs/make_aliccp_fixture.py --out var/aliccp/raw --seed 7

Exactly the raw format (``\\x01`` / ``\\x02`` / ``\\x03`` separators), with multi-valued
fields, a hot common-feature key and one line of dirt per quarantine reason; see
:func:`tests.aliccp_fixture.write_fixture` (standard library only: no Spark needed).
Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from features.cli import die  # noqa: E402
from tests.aliccp_fixture import write_fixture  # noqa: E402

PROG = "make_aliccp_fixture.py"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the fixture."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the four files into")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--train-samples", type=int, default=3000)
    parser.add_argument("--test-samples", type=int, default=1500)
    args = parser.parse_args(argv)
    if args.train_samples < 10 or args.test_samples < 10:
        die(PROG, "--train-samples and --test-samples must be at least 10")
    counts = write_fixture(args.out, args.seed, args.train_samples, args.test_samples)
    for split, c in counts.items():
        print(f"{PROG}: {split}: {c['skeleton_lines']} skeleton, {c['common_lines']} common lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
