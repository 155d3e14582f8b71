"""Run every benchmark in bench/ (files named bench_*.py), one process each.

Each benchmark measures its variants side by side in one process and prints
ratios; absolute times on shared machines are not comparable across runs.
Output is also written to bench/results/<name>.txt.

Usage: python bench/run.py [NAME ...]   (NAME: e.g. losses for bench_losses.py)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
        if not scripts:
            print(f"no benchmark named {sorted(wanted)}; have: "
                  f"{[s.stem.removeprefix('bench_') for s in sorted(HERE.glob('bench_*.py'))]}")
            return 2
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr, end="")
            failed.append(script.name)
        tmp = out_dir / f".{script.stem}.txt.tmp"
        tmp.write_text(proc.stdout + proc.stderr)
        tmp.replace(out_dir / f"{script.stem}.txt")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
