"""Benchmarks that time configurations against each other, each in a fresh process so that its peak memory is its
own: the parent runs ``python SCRIPT ARGV --worker CONFIG`` per configuration and reads the one ``RESULT {json}``
line the worker prints, then writes the collected runs and prints their ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

RESULT = "RESULT "


def report(result: dict) -> None:
    """A worker's output: its result dict on one ``RESULT`` line."""
    print(RESULT + json.dumps(result), flush=True)


def run_workers(script: str, configs: Iterable[str], argv: List[str]) -> Dict[str, dict]:
    """``{config: the result its worker reported}``, each run as ``python SCRIPT ARGV --worker CONFIG`` with this
    folder on the path; a worker that fails or reports nothing stops the benchmark with its error output."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(script)), TOKENIZERS_PARALLELISM="false")
    runs: Dict[str, dict] = {}
    for cfg in configs:
        proc = subprocess.run([sys.executable, os.path.abspath(script), *argv, "--worker", cfg],
                              capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
        if proc.returncode or not line:
            raise SystemExit(f"{cfg} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        runs[cfg] = json.loads(line[0][len(RESULT):])
        print(cfg, json.dumps(runs[cfg]), flush=True)
    return runs


def write_and_show_ratios(res: dict, out: Optional[str]) -> None:
    """``res`` to ``out`` (JSON, when given), then every run's ``*ratio*`` fields."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: {kk: v for kk, v in r.items() if "ratio" in kk} for k, r in res["runs"].items()}, indent=2))
