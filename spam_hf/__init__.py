"""spam-hf: SpaM (Bayesian structured sparsification by marginal likelihood) for HuggingFace transformers.

The public names load on first use, so ``import spam_hf`` (and ``spam-hf --help``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {  # name: the module that defines it
    "get_family": "architectures", "group_specs": "architectures", "supported_model_types": "architectures",
    "CurvatureAccumulator": "curvature",
    "log_marginal_likelihood": "marglik", "optimize_prior": "marglik",
    "PriorPrecision": "priors",
    "SpamTrainingArguments": "training_arguments",
    "SpamLaplace": "posterior",
    "PruningConfig": "pruning", "PruningPlan": "pruning", "apply": "pruning", "plan": "pruning", "prune": "pruning",
    "SpamTrainer": "trainer",
    "DistillationTrainer": "distill",
    "from_pretrained": "export", "save_pruned": "export",
}
__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .architectures import get_family, group_specs, supported_model_types  # noqa: F401
    from .curvature import CurvatureAccumulator  # noqa: F401
    from .distill import DistillationTrainer  # noqa: F401
    from .export import from_pretrained, save_pruned  # noqa: F401
    from .marglik import log_marginal_likelihood, optimize_prior  # noqa: F401
    from .posterior import SpamLaplace  # noqa: F401
    from .priors import PriorPrecision  # noqa: F401
    from .pruning import PruningConfig, PruningPlan, apply, plan, prune  # noqa: F401
    from .trainer import SpamTrainer  # noqa: F401
    from .training_arguments import SpamTrainingArguments  # noqa: F401
