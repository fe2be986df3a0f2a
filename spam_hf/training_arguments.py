"""``SpamTrainingArguments``: ``transformers.TrainingArguments`` plus the SpaM knobs of :class:`~.arguments.SpamArguments`.

Apart from ``arguments.py`` because it imports transformers (and with it torch), which parsing the other
options and printing ``--help`` do not need.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from .arguments import SpamArguments


@dataclass
class SpamTrainingArguments(TrainingArguments, SpamArguments):
    """``TrainingArguments`` plus the SpaM knobs (:class:`~spam_hf.arguments.SpamArguments`: priors, curvature,
    prior fits, pruning during training). The prior replaces weight decay on the parameters it covers."""

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        SpamArguments.__post_init__(self)
