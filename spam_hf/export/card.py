"""Model card for an exported model, rendered from ``spam_hf/model_cards/`` with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import os
from typing import Any, Dict

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_cards", "default.md")


def render_model_card(info: Dict[str, Any], template_path: str = TEMPLATE) -> ModelCard:
    """Fill the template. ``info`` keys are the template's variables (missing ones render as 'n/a')."""
    base = str(info.get("base_model", "unknown"))
    adapter = bool(info.get("peft_adapter"))
    data = ModelCardData(library_name="peft" if adapter else "transformers",
                         tags=["spam-hf", "pruned", "structured-sparsity"] + (["lora"] if adapter else []),
                         base_model=base if "/" in base and not os.path.exists(base) else None,
                         pipeline_tag=info.get("pipeline_tag", "text-classification"))
    fields = {k: ("n/a" if v is None else v) for k, v in info.items()}
    hub_id = "/" in base and not os.path.exists(base)
    fields.setdefault("base_model_url", f"https://huggingface.co/{base}" if hub_id else base)
    for key in ("params_before", "params_after", "block_params_before", "block_params_after", "flops_before",
                "flops_after", "metric_name", "metric_before", "metric_after", "latency_before", "latency_after",
                "latency_batch", "latency_device", "seq_len", "sparsity_achieved", "sparsity_target", "budget",
                "dataset", "eval_dataset", "prior", "curvature", "method", "recovery", "date", "command",
                "repo_or_path", "model_name", "environment"):
        fields.setdefault(key, "n/a")
    fields.setdefault("layers", [])
    fields.setdefault("trust_remote_code", False)
    fields.setdefault("peft_adapter", False)
    fields.setdefault("auto_class", "AutoModelForSequenceClassification")
    return ModelCard.from_template(data, template_path=template_path, **fields)
