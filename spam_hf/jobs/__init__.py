"""The ``compress`` / ``prune`` / ``evaluate`` jobs behind the CLI, callable from Python.

One module per job (:mod:`.compress`, :mod:`.reprune`, :mod:`.evaluate`) and per concern they share:
:mod:`.dry_run` (predicted memory, :mod:`spam_hf.memory`), :mod:`.resolve` (model names), :mod:`.loading` (data and models), :mod:`.outputs` (output directories,
run files), :mod:`.reporting` (snapshots, table, card, report) and :mod:`.finish` (the pruning stage).
"""

from .compress import compress
from .dry_run import dry_run
from .evaluate import evaluate_checkpoint
from .reprune import reprune

__all__ = ["compress", "dry_run", "evaluate_checkpoint", "reprune"]
