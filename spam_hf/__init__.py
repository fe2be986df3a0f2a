"""spam-hf: SpaM (Bayesian structured sparsification by marginal likelihood) for HuggingFace transformers."""

__version__ = "0.1.0"

from .architectures import get_family, group_specs, supported_model_types  # noqa: E402
from .curvature import CurvatureAccumulator  # noqa: E402
from .marglik import log_marginal_likelihood, optimize_prior  # noqa: E402
from .priors import PriorPrecision  # noqa: E402
from .arguments import PruneArguments, SpamTrainingArguments  # noqa: E402
from .posterior import SpamLaplace  # noqa: E402
from .pruning import PruningConfig, PruningPlan, apply, plan, prune  # noqa: E402
from .trainer import SpamTrainer  # noqa: E402
from .distill import DistillationTrainer  # noqa: E402
from .export import from_pretrained, save_pruned  # noqa: E402

__all__ = [
    "CurvatureAccumulator",
    "DistillationTrainer",
    "PriorPrecision",
    "PruneArguments",
    "PruningConfig",
    "PruningPlan",
    "SpamLaplace",
    "SpamTrainer",
    "SpamTrainingArguments",
    "apply",
    "from_pretrained",
    "get_family",
    "group_specs",
    "log_marginal_likelihood",
    "optimize_prior",
    "plan",
    "prune",
    "save_pruned",
    "supported_model_types",
]
