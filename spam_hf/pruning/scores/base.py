"""The score registry: what a group score is, which statistics it reads, how it prunes by default.

A score turns statistics of a model into ``{spec.name: FloatTensor[G]}`` (higher = more important) for
every group spec. Each score module registers one :class:`Score`; everything that needs to know what a
score requires (``plan``, ``prune``, the CLI's ``--method``, post-hoc fitting in ``compress``) asks the
registry instead of keeping its own list of names.

Statistics a score can need (:data:`STATISTICS`):

* ``diagonal``: the curvature diagonal ``diag H`` and the prior precisions of the *trained* posterior
  (what training with SpamTrainer, or a post-hoc fit, leaves);
* ``factors``: full KFAC factors ``(A, G)`` of calibration batches of the *current* model;
* ``mask_fisher``: the Fisher of masks on the consuming modules' input columns, of calibration batches;
* ``input_moments``: the mean and variance of each input channel of the consuming modules, of calibration batches.

The last three are calibration statistics: a posterior collects them for the model as it is when the
score runs (every round of :func:`spam_hf.pruning.prune`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...architectures import consuming_modules
from ...architectures.base import GroupSpec
from ...checks import check_choice
from ...priors import PriorPrecision, params_aug

STATISTICS = ("diagonal", "factors", "mask_fisher", "input_moments")
CALIBRATION_STATISTICS = ("factors", "mask_fisher", "input_moments")
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Statistics:
    """What a score reads. Fields a score does not need may be ``None``.

    Attributes:
        prior: the prior precisions ``δ`` (``opd``).
        temperature: ``T`` of the tempered likelihood.
        diagonal: ``{module: diag H}`` (``out × (in+1)``, float64), the trained curvature's diagonal.
        factors: ``{module: (A, G)}`` float64 KFAC factors (``A`` over ``[x | 1]``, ``G`` extrapolated to ``N``).
        mask_fisher: ``{consuming module: M}`` (``in × in``), the Fisher of input-column masks.
        input_moments: ``{consuming module: (mean, variance)}`` (``[in]`` each) of its input channels.
    """

    prior: Optional[PriorPrecision] = None
    temperature: float = 1.0
    diagonal: Optional[Dict[str, object]] = None
    factors: Optional[Factors] = None
    mask_fisher: Optional[Dict[str, torch.Tensor]] = None
    input_moments: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None

    @classmethod
    def of(cls, posterior, needs: Tuple[str, ...]) -> "Statistics":
        """The statistics ``needs`` names, read from ``posterior`` (a :class:`~spam_hf.posterior.SpamLaplace`, or
        ``None`` for scores that need nothing). Only what is needed is computed: factors and mask Fisher cost an
        ``(in+1)²`` and an ``out²`` matrix per module."""
        if posterior is None:
            return cls()
        return cls(prior=posterior.prior, temperature=posterior.temperature,
                   diagonal=posterior.diagonal() if "diagonal" in needs else None,
                   factors=posterior.factors() if "factors" in needs else None,
                   mask_fisher=posterior.group_fisher() if "mask_fisher" in needs else None,
                   input_moments=posterior.input_moments() if "input_moments" in needs else None)


ScoreFn = Callable[[nn.Module, List[GroupSpec], Statistics, int], Dict[str, torch.Tensor]]


def summed_over_columns(model: nn.Module, specs: List[GroupSpec],
                        column_score: Callable[[str, torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: each group's sum of ``column_score(module, W)`` over the columns it owns in
    its consuming modules (O for a head, down for a neuron, ``lora_B`` for a rank). ``W`` is the module's
    ``out × (in+1)`` weight with the bias column last (:func:`spam_hf.priors.params_aug`); ``column_score`` returns
    one float64 score per input column (``[in]`` or ``[in+1]``), the form the per-channel peer scores take."""
    params = params_aug(model, consuming_modules(specs))
    out = {}
    for s in specs:
        total = torch.zeros(s.count, dtype=torch.float64)
        for m, idx in s.col_index.items():
            total += column_score(m, params[m])[idx].sum(1)
        out[s.name] = total
    return out


@dataclass(frozen=True)
class Score:
    """One group score.

    Attributes:
        name: the ``--method`` value.
        compute: ``(model, specs, statistics, seed) -> {spec.name: FloatTensor[G]}``.
        needs: the :data:`STATISTICS` it reads.
        rounds: on a full model, prune in rounds with compensation by default (scores that measure the damage
            of removing a group from calibration statistics of the current model); otherwise one shot, no
            compensation. LoRA ranks always default to one shot.
        consuming_only: its calibration statistics are those of the consuming modules alone (O, down, ``lora_B``:
            the columns a group owns), so a calibration posterior need not hold factors of the other modules.
        compensation: the compensation it comes with by default (``compensate`` left unset), e.g. ``bias`` for
            ``flap``; ``None``: compensation follows ``rounds``.
        summary: one line for ``--help`` and the docs.
    """

    name: str
    compute: ScoreFn = field(repr=False)
    needs: Tuple[str, ...] = ()
    rounds: bool = False
    consuming_only: bool = False
    compensation: Optional[str] = None
    summary: str = ""

    def __post_init__(self) -> None:
        for need in self.needs:
            check_choice(f"statistics of score {self.name!r}", need, STATISTICS)

    @property
    def calibrated(self) -> bool:
        """Whether it reads statistics of calibration batches of the current model (collected before scoring)."""
        return any(n in CALIBRATION_STATISTICS for n in self.needs)

    @property
    def collects_consuming_only(self) -> bool:
        """Calibration statistics for it (and for compensation around it) are the consuming modules' alone: it reads
        only theirs, or no statistics at all (then only compensation reads any)."""
        return self.consuming_only or not self.needs

    @property
    def needs_posterior(self) -> bool:
        return bool(self.needs)

    def __call__(self, model: nn.Module, specs: List[GroupSpec], statistics: Statistics,
                 seed: int = 0) -> Dict[str, torch.Tensor]:
        for need in self.needs:
            if getattr(statistics, need) is None:
                raise ValueError(f"method {self.name!r} needs {_NEED_TEXT[need]}")
        return self.compute(model, list(specs), statistics, seed)


_NEED_TEXT = {
    "diagonal": "curvature (train with SpamTrainer or fit priors post hoc first)",
    "factors": "Kronecker factors (SpamLaplace.collect() on calibration batches, then factors())",
    "mask_fisher": "the mask Fisher (SpamLaplace(mask_fisher=True).collect())",
    "input_moments": "input means (SpamLaplace(input_means=True).collect())",
}

REGISTRY: Dict[str, Score] = {}


def register(score: Score) -> Score:
    """Add ``score`` to the registry (its name must be new); returns it."""
    if score.name in REGISTRY or score.name == "auto":
        raise ValueError(f"a score named {score.name!r} is already registered")
    REGISTRY[score.name] = score
    return score
