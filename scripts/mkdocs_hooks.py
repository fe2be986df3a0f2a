"""mkdocs hooks: pages generated from the code, so that the site cannot drift from it.

- ``index.md``: the README, with its links rewritten for the site (``docs/x.md`` → ``x.md``).
- ``cli.md``: every option of ``compress``, ``prune`` and ``evaluate`` from the argument dataclasses
  (``<!-- cli-reference -->``).
- ``benchmarks.md``: every script in ``benchmarks/`` with its docstring (``<!-- benchmark-scripts -->``).
- The plots in ``benchmarks/results/`` become files of the site, so pages link them as ``../benchmarks/...``,
  which GitHub resolves too.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_files(files, config):
    """Add ``benchmarks/results/*.png`` to the site (under ``benchmarks/results/``)."""
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.png"))):
        files.append(File(os.path.relpath(path, ROOT), ROOT, config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- readme -->" in markdown:
        markdown = markdown.replace("<!-- readme -->", readme_for_site())
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    if "<!-- benchmark-scripts -->" in markdown:
        markdown = markdown.replace("<!-- benchmark-scripts -->", benchmark_scripts())
    # a page at the top of docs/ links a plot as ../benchmarks/results/x.png (right on GitHub); on the site the
    # plot is at benchmarks/results/x.png
    return markdown.replace("](../benchmarks/results/", "](benchmarks/results/")


def readme_for_site() -> str:
    """The README with links into ``docs/`` made site-relative, and links to other repository files (an example
    script) made plain code; a link to a file that does not exist is left alone, so ``--strict`` reports it."""
    text = open(os.path.join(ROOT, "README.md")).read()

    def fix(match):
        label, target = match.group(1), match.group(2)
        if target.startswith(("http://", "https://", "#")):
            return match.group(0)
        if target.startswith("docs/"):
            return f"[{label}]({target[len('docs/'):]})"
        if target.startswith("benchmarks/results/"):
            return match.group(0)
        if os.path.exists(os.path.join(ROOT, target)):
            return label if label.startswith("`") else f"`{label}`"
        return match.group(0)

    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", fix, text)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields_table(dataclass_type, only_own_of=None) -> str:
    """Markdown table of a dataclass's fields: option, default, accepted values, help."""
    from spam_hf.cli import help_text

    rows = ["| option | default | accepted values | what it does |", "|---|---|---|---|"]
    skip = {f.name for f in dataclasses.fields(only_own_of)} if only_own_of else set()
    for f in dataclasses.fields(dataclass_type):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        choices = f.metadata.get("choices")
        accepted = ", ".join(f"`{c}`" for c in choices) if choices else ""
        text = help_text(f).replace("|", "\\|")
        rows.append(f"| `{_option(f.name)}` | `{default!r}` | {accepted} | {text} |")
    return "\n".join(rows)


def cli_reference() -> str:
    from transformers import TrainingArguments

    from spam_hf.cli import command_sections

    out = []
    for command, groups in command_sections(full=True):
        out.append(f"## spam-hf {command}\n")
        for title, dtype in groups:
            doc = (dtype.__doc__ or "").strip().split("\n\n")[0]
            base = TrainingArguments if issubclass(dtype, TrainingArguments) else None
            out.append(f"### {title}\n\n{' '.join(doc.split())}\n\n{_fields_table(dtype, base)}\n")
        if command == "compress":
            out.append("Every option of `transformers.TrainingArguments` is accepted too (`--num-train-epochs`, "
                       "`--learning-rate`, `--bf16`, `--resume-from-checkpoint`, ...): see the "
                       "[transformers documentation](https://huggingface.co/docs/transformers/main_classes/"
                       "trainer#transformers.TrainingArguments), or `spam-hf compress --help-all`.\n")
    return "\n".join(out)


def benchmark_scripts() -> str:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        name = os.path.relpath(path, ROOT)
        out.append(f"### `{name}`\n\n```text\n{doc.strip()}\n```\n")
    return "\n".join(out)
