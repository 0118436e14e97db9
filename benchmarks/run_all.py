"""Run every benchmark, full or ``--quick``, and print their tables.

    python benchmarks/run_all.py            # the figures in docs/performance.md
    python benchmarks/run_all.py --quick    # a smoke run of each (what CI runs)

Each benchmark writes ``benchmarks/results/<name>[_quick].json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "ingest",
    "inference",
    "worker",
    "explain",
    "head_mask",
    "end_to_end",
    "memory",
    "store_backends",
    "alerts",
    "sequence",
    "web",
    "results_stage",
    "gc_pauses",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    failed = []
    for name in args.only:
        print(f"\n## {name}", flush=True)
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
