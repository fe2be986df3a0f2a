"""Output directories: checked before any work, and the run files written into them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

RUN_CONFIG = "run_config.json"
REPORT_FILE = "pruning_report.json"


def check_output_dir(path: str, overwrite: bool) -> None:
    """Fail before any work when ``path`` is a non-empty directory (without ``overwrite``) or cannot be written.

    Writability is probed for real (a temporary folder created and removed in the nearest existing
    ancestor), so read-only mounts and files in the way are caught as well as permission bits.
    """
    if not str(path).strip():
        raise ValueError("--output-dir is empty; give the folder to write the run into")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"output dir {path!r} exists and is not a directory")
        if os.listdir(path) and not overwrite:
            raise ValueError(f"output dir {path!r} is not empty; pass --overwrite-output-dir to reuse it")
        probe_in = path
    else:
        probe_in = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe_in):
            probe_in = os.path.dirname(probe_in)
        if not os.path.isdir(probe_in):
            raise ValueError(f"output dir {path!r} cannot be created: {probe_in!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".spam-hf-probe-", dir=probe_in))
    except OSError as e:
        raise ValueError(f"output dir {path!r} is not writable ({probe_in!r}: {e.strerror})") from None


def check_reprune_output(run_dir: str, out: str, overwrite: bool) -> None:
    """``out`` may not be the run itself or a folder holding it (its export and report would be replaced), and
    must be empty unless ``overwrite``: a re-prune never deletes what it did not write in this call."""
    run, target = os.path.realpath(run_dir), os.path.realpath(out)
    if target == run or run.startswith(target + os.sep):
        raise ValueError(f"output dir {out!r} holds the run {run_dir!r} itself; re-pruning there would replace its "
                         "export and report: choose another --output-dir")
    check_output_dir(out, overwrite)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def write_run_config(out_dir: str, model_args, data_args, pruning, args, train_args, path: str, command: str,
                     lora_args: Optional[object] = None) -> None:
    """``run_config.json``: every argument of a ``compress`` run (what ``spam-hf prune`` rebuilds it from); its
    ``compress`` section holds the pruning config as given and compress's other options, by their option names.
    Local data files and a local model folder are stored as absolute paths, so ``prune`` works from any
    working directory."""
    data = dataclasses.asdict(data_args)
    for key in ("train_file", "validation_file"):
        if data.get(key) and os.path.exists(data[key]):
            data[key] = os.path.abspath(data[key])
    write_json(os.path.join(out_dir, RUN_CONFIG), {
        "model": dataclasses.asdict(model_args), "resolved_model": os.path.abspath(path) if os.path.isdir(path) else path,
        "lora": dataclasses.asdict(lora_args) if lora_args is not None else {},
        "data": data, "compress": {**dataclasses.asdict(pruning), **dataclasses.asdict(args)},
        "training": dict(train_args.to_dict()), "command": command,
    })


@contextlib.contextmanager
def staged_folder(final: Optional[str]) -> Iterator[Optional[str]]:
    """Write a folder into place in one rename: yields a hidden temporary folder beside ``final``
    (``.<name>.partial-*``); when the block ends without an error the old ``final`` (this job's own
    export) is removed and the temporary folder renamed to ``final``. On an error it is removed and
    ``final`` is untouched, so an interrupted export never looks like a finished one. ``None`` → ``None``.
    """
    if final is None:
        yield None
        return
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.partial-")
    os.chmod(stage, 0o755)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(stage, final)
    _repoint(final, stage)


def _repoint(folder: str, old: str) -> None:
    """JSON and markdown files under ``folder`` that name the staging path (a LoRA adapter's
    ``base_model_name_or_path`` pointing at its pruned ``base/``) name ``folder`` instead."""
    new = os.path.abspath(folder)
    for root, _, files in os.walk(folder):
        for f in files:
            if not f.endswith((".json", ".md")):
                continue
            path = os.path.join(root, f)
            with open(path) as fh:
                text = fh.read()
            if old in text:
                with open(path, "w") as fh:
                    fh.write(text.replace(old, new))
