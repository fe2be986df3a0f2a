"""Folders the exports write: checked before any work, and put into place in one rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Optional


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
