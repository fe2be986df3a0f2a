"""What the options accept: every choice list and preset table, in one module that imports nothing heavy.

The argument dataclasses (``arguments.py``) read their choices here, so parsing and ``--help`` need neither
torch nor the implementation modules; each implementation module imports the list it enforces from here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

PRIOR_KINDS = ("scalar", "layer", "unit", "parameter")
"""``--prior``: one precision for the model, per layer, per group (head / neuron / rank), per parameter."""
CURVATURE_KINDS = ("kfac", "diag")
REDUCTIONS = ("reduce", "expand", "reduce-gw")
"""``--kfac_reduction`` (besides ``auto``): sequences or tokens as the rows of the Kronecker factors."""
FISHER_TYPES = ("mc", "empirical")
DIAGONAL_FROM = 4096
"""KFAC factors at least this wide keep only their diagonal while priors are learnt (an LLM's MLP; no encoder)."""
COMPENSATIONS = ("least-squares", "posterior", "bias", "reference")
BUDGETS = ("params", "flops")
TRAINING_MODES = ("spam", "plain", "none")
SCHEDULE_METHODS = ("fisher", "opd", "magnitude", "damage")
LM_EXTENSIONS = (".txt",)
"""Data files read as plain text for language modelling."""


@dataclass(frozen=True)
class TaskPreset:
    """A ``--task``: its Hub dataset, columns, splits, metric and kind."""

    hub: Tuple[str, ...]
    text: str
    label: Optional[str] = "label"
    pair: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    metric: str = "accuracy"
    kind: str = "classification"  # or "causal_lm"


TASKS: Dict[str, TaskPreset] = {
    "sst2": TaskPreset(("nyu-mll/glue", "sst2"), "sentence"),
    "cola": TaskPreset(("nyu-mll/glue", "cola"), "sentence", metric="matthews_correlation"),
    "mrpc": TaskPreset(("nyu-mll/glue", "mrpc"), "sentence1", pair="sentence2"),
    "qnli": TaskPreset(("nyu-mll/glue", "qnli"), "question", pair="sentence"),
    "rte": TaskPreset(("nyu-mll/glue", "rte"), "sentence1", pair="sentence2"),
    "mnli": TaskPreset(("nyu-mll/glue", "mnli"), "premise", pair="hypothesis", eval_split="validation_matched"),
    "imdb": TaskPreset(("stanfordnlp/imdb",), "text", eval_split="test"),
    "wikitext": TaskPreset(("Salesforce/wikitext", "wikitext-2-raw-v1"), "text", label=None, metric="perplexity",
                           kind="causal_lm"),
}

_SCORES_DIR = os.path.join(os.path.dirname(__file__), "pruning", "scores")


def score_names() -> Tuple[str, ...]:
    """``--method`` values besides ``auto``: one per score module in ``pruning/scores/`` (file ``damage_obs.py``
    registers ``damage-obs``), read from the folder without importing the scores (``tests/test_scores.py`` checks
    that the registry agrees)."""
    return tuple(sorted(f[:-3].replace("_", "-") for f in os.listdir(_SCORES_DIR)
                        if f.endswith(".py") and f not in ("__init__.py", "base.py")))
