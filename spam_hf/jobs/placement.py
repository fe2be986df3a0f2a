"""``--device-map``: what a job does with a model dispatched by accelerate's big-model hooks (some blocks on the
GPU, the rest in CPU memory or on disk), and what it refuses before loading it.

Such a model is compressed post hoc, block by block (:mod:`spam_hf.pruning.sequential`; offloaded blocks are
brought onto the device one at a time, :mod:`spam_hf.offload`). Training it, recovering it, or timing it would
train or time the transfers, so the job refuses the first two and skips the third.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from transformers.utils import logging

from ..architectures import get_family
from ..arguments import CompressArguments, LoraArguments, ModelArguments
from ..pruning import PruningConfig

logger = logging.get_logger("spam_hf")


def placement_refusal(config: PruningConfig, args: CompressArguments, lora_args: LoraArguments,
                      world_size: int) -> str:
    """Why a ``--device-map`` job cannot run as asked, or ``""``."""
    if args.training != "none":
        return (f"--device-map dispatches the model for post-hoc compression (--training none); --training "
                f"{args.training} would train a model whose blocks move between devices at every step")
    if lora_args.enabled:
        return "--device-map compresses a full model block by block; LoRA ranks are pruned on a model in memory"
    if config.sequential is False:
        return "--device-map prunes block by block (--sequential True): the statistics of every block at once are " \
               "what does not fit"
    if args.recovery_steps or args.recovery_epochs:
        return "--device-map has no recovery fine-tune (it would train the offloaded model); recover the export " \
               "on a machine where it fits"
    if config.drop_blocks is not None:
        return "--drop-blocks is not supported with --device-map yet"
    if world_size > 1:
        return "--device-map places one model across this machine's devices; launch one process"
    score = config.resolved(False).score
    if "diagonal" in score.needs:
        return (f"--method {config.method} reads the trained posterior's curvature of every module at once; with "
                "--device-map use a score computed block by block (the default)")
    return ""


def _family_refusal(model_args: ModelArguments) -> str:
    """Why the model's family cannot be dispatched (its config read before loading), or ``""``."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_args.model_name_or_path).model_type
        reason = get_family(model_type).device_map_refusal
    except (OSError, ValueError):  # loading says what is wrong with the path or the model type
        return ""
    return f"--device-map is not supported for {model_type} yet: {reason}" if reason else ""


def dispatched_job(model_args: ModelArguments, config: PruningConfig, args: CompressArguments,
                   lora_args: LoraArguments, world_size: int) -> Tuple[PruningConfig, CompressArguments]:
    """``(config, args)`` for the job: unchanged without ``--device-map``; with it, block by block and without the
    latency lines (or a one-line refusal, before anything is loaded)."""
    if model_args.device_map is None:
        return config, args
    reason = placement_refusal(config, args, lora_args, world_size) or _family_refusal(model_args)
    if reason:
        raise ValueError(reason)
    if args.measure_latency:
        logger.info("--device-map: latency is not measured (an offloaded model's time is its transfers)")
        args = dataclasses.replace(args, measure_latency=False)
    return config.replace(sequential=True, rounds=1), args
