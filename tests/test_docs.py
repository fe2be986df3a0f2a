"""The README stays a product page whose commands are the ones CI runs; the docs site lists every page."""

import os
import re

import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme():
    return open(os.path.join(ROOT, "README.md")).read()


def test_readme_is_a_short_page_whose_links_exist():
    text = readme()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not target.startswith(("http://", "https://", "#")):
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_readme_commands_are_what_ci_runs():
    """The README's test command, step by step, is what .ci/run does on a fresh clone (CI installs what the
    README says, then runs the same two pytest sets), and CI builds the docs."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_line = next(line for line in readme().splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    steps = test_line.split(" && ")[2:]
    assert steps == ["pip install torch==2.13.0", 'pip install -e ".[test,demo]"', 'python -m pytest -q -m "not slow"',
                     "python -m pytest -q -m slow"]
    assert "pip install --quiet torch==2.13.0" in ci and 'pip install --quiet -e ".[test,demo]"' in ci
    assert 'python -m pytest -q -m "$1"' in ci and 'run_set "not slow"' in ci and 'run_set "slow"' in ci
    assert "mkdocs build --strict" in ci


def test_every_docs_page_is_in_the_site_navigation():
    config = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))
    nav = {list(item.values())[0] for item in config["nav"]}
    pages = {f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")}
    assert nav == pages
