"""`toolkit --help` start-up time, against importing torch+torchvision in the same run.

Target: `toolkit --help` answers in under 0.5 s (the CLI imports no torch at start-up).

    .venv/bin/python bench/bench_cli_startup.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median, python, wall_times


def main() -> None:
    toolkit = shutil.which("toolkit", path=str(Path(python()).parent)) or "toolkit"
    rows = {
        "python -c pass (interpreter floor)": [python(), "-c", "pass"],
        "toolkit --help": [toolkit, "--help"],
        "toolkit --version": [toolkit, "--version"],
        "python -c 'import torch, torchvision' (baseline)": [python(), "-c", "import torch, torchvision"],
    }
    results = {name: median(wall_times(cmd)) for name, cmd in rows.items()}
    baseline = results["python -c 'import torch, torchvision' (baseline)"]
    print("| command | median wall (s) | vs torch import |")
    print("|---|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {seconds / baseline:.2f}x |")
    verdict = "PASS" if results["toolkit --help"] < 0.5 else "FAIL"
    print(f"\ntoolkit --help: {results['toolkit --help']:.3f} s (target < 0.5 s): {verdict}")


if __name__ == "__main__":
    main()
