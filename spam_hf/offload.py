"""Models dispatched by accelerate's big-model hooks (``from_pretrained(device_map=..., offload_folder=...)``,
``accelerate.cpu_offload``): where their inputs go, and one block's weights made real for a while.

An offloaded module holds its parameters on the ``meta`` device; an ``AlignDevicesHook`` (``offload=True``) copies
them from its ``weights_map`` (CPU memory, or a memory-mapped folder for ``"disk"``) onto the execution device
before each forward and drops them after. Running such a model needs nothing from spam-hf. Editing it does:
compensation and surgery write new (smaller) weights, which the hook would drop. :func:`onloaded` therefore takes
a block's offloaded modules off their hooks, with real weights on the execution device, for as long as the block is
scored, refitted and cut, and then offloads it again: unchanged, under its own hooks; changed, under new hooks whose
weights map holds the compressed weights in CPU memory (a block offloaded to disk comes back to CPU memory,
smaller). Only one block's weights are on the execution device at a time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn


def _offload_hook(module: nn.Module):
    """The module's own accelerate hook when it offloads the module's weights, else ``None``."""
    from accelerate.hooks import AlignDevicesHook

    hook = getattr(module, "_hf_hook", None)
    return hook if isinstance(hook, AlignDevicesHook) and hook.offload else None


def offloaded_modules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, submodule)]`` of ``module`` (itself included) whose weights an accelerate hook offloads."""
    return [(n, m) for n, m in module.named_modules() if _offload_hook(m) is not None]


def is_offloaded(model: nn.Module) -> bool:
    """Whether any weight of ``model`` lives off the execution device behind an accelerate hook."""
    return bool(offloaded_modules(model))


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the execution device of its input embedding's hook when it has one (a dispatched
    model), else the device of its first parameter that is not on ``meta``."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    raise ValueError("every parameter of the model is on the meta device and no hook says where it runs")


@contextlib.contextmanager
def onloaded(block: nn.Module, changed: bool = True) -> Iterator[None]:
    """Inside: every offloaded module of ``block`` has real weights on its execution device and no offload hook,
    so its weights can be read, refitted and replaced. After: the block is offloaded again (a block that was not
    offloaded is left alone).

    Args:
        changed: the block's weights may change inside; after, each module of the block that holds parameters gets a
            new offload hook over a CPU copy of its (new) weights. ``False``: the original hooks go back, over
            their original weights map (nothing is copied back).
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    offloaded = offloaded_modules(block)
    if not offloaded:
        yield
        return
    hooks = {}
    device = None
    for name, module in offloaded:
        hook = module._hf_hook
        device = hook.execution_device if device is None else device
        hook.pre_forward(module)  # the weights onto the execution device (accelerate's own onloading)
        remove_hook_from_module(module)  # the weights stay real (their original device was meta)
        hooks[name] = hook
    try:
        yield
    finally:
        if not changed:
            modules = dict(block.named_modules())
            for name, hook in hooks.items():
                add_hook_to_module(modules[name], hook)  # init_hook puts the weights back on meta
        else:
            for _, module in block.named_modules():
                params = dict(module.named_parameters(recurse=False))
                if params and getattr(module, "_hf_hook", None) is None:  # was offloaded, or new from surgery
                    weights = {n: p.detach().to("cpu") for n, p in params.items()}
                    add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True,
                                                                weights_map=weights))
