"""Run folders: checked before any work (:mod:`spam_hf.export.folders`), and the run files written into them."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from ..export.folders import check_output_dir

RUN_CONFIG = "run_config.json"
REPORT_FILE = "pruning_report.json"


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


