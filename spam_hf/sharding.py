"""What FSDP2 (``fully_shard``: weights as row-sharded ``DTensor``) changes for SpaM's statistics.

A model loaded with ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=P))`` (transformers'
own FSDP2, which the Trainer trains without a DDP wrap) holds each weight ``W`` (``out × in``) as a ``DTensor``
of ``Shard(0)``: process ``r`` keeps rows ``[o_r, o_r + n_r)``. Inside a forward the whole weight is gathered, so
the curvature hooks see what they see in one process; outside it only the local rows exist. SpaM then:

* gives each module's curvature sums one **owner** process (:func:`assign_owners`, contiguous and balanced by
  factor size): every process adds its rows' contribution, the sums are reduced onto the owner at each curvature
  step, and only the owner keeps them, so each process holds about ``1/P`` of the factors;
* takes the MAP penalty ``½ Σ_ij Δ_ij W_ij²`` on the local rows only (:func:`local_rows`): its gradient lands on
  the local shard and nowhere else, which is what one process's gradient is, row by row;
* reduces the weight terms of ``log Z`` from the shards (:func:`squared_sums`): the row sums of ``W²`` are
  local rows placed at their offset and summed over processes, the column sums are summed over processes.

Every helper is the identity for a plain tensor.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from .distributed import all_reduce_sum, broadcast_parameters

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without torch.distributed
    DTensor = None


def is_sharded(t: Optional[torch.Tensor]) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter of a ``fully_shard`` module outside its forward)."""
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters is sharded (FSDP2)."""
    return any(is_sharded(p) for p in model.parameters())


def local_rows(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(local, offset)``: this process's rows of a row-sharded ``t`` (``[n_r, ...]``, differentiable) and the
    index of its first row in the whole tensor; ``(t, 0)`` for a plain tensor or a replicated one."""
    if not is_sharded(t):
        return t, 0
    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in t.placements):
        raise ValueError(f"spam-hf reads FSDP2 weights sharded on their rows (Shard(0)); got {t.placements}")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0]) if offset else 0


def squared_sums(w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 keep_full: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Of ``W_aug = [W | b]`` (``out × (in+1)``; float64, CPU): the row sums of ``W_aug²`` (``[out]``), the
    column sums (``[in+1]``) and, with ``keep_full``, ``W_aug²`` itself. From a sharded ``W`` (``b`` sharded the
    same way) each process squares its rows only: row sums at their offset, zero elsewhere, then both sums are
    summed over processes (every process must call this for the same modules in the same order); ``W_aug²`` is
    gathered whole (only a ``parameter`` prior needs it)."""
    local_w, offset = local_rows(w.detach())
    local = local_w.to(torch.float64)
    if bias is not None:
        local_b, _ = local_rows(bias.detach())
        local = torch.cat([local, local_b.to(torch.float64).unsqueeze(1)], dim=1)
    local = local.cpu().square()
    if not is_sharded(w):
        return local.sum(1), local.sum(0), local if keep_full else None
    rows = torch.zeros(w.shape[0], dtype=torch.float64)
    rows[offset: offset + local.shape[0]] = local.sum(1)
    full = None
    if keep_full:
        whole = w.detach().full_tensor().to(torch.float64).cpu()
        if bias is not None:
            whole = torch.cat([whole, bias.detach().full_tensor().to(torch.float64).cpu().unsqueeze(1)], dim=1)
        full = whole.square()
    return all_reduce_sum(rows), all_reduce_sum(local.sum(0)), full


def assign_owners(sizes: Dict[str, int], processes: int) -> Dict[str, int]:
    """``{module: rank}``: modules in their order cut into ``processes`` contiguous runs of about equal total
    ``sizes`` (the factor elements, ``in² + out²``), so neighbouring modules (one block's) mostly share an owner
    and no process holds much more than ``1/P`` of the curvature."""
    total = float(sum(sizes.values())) or 1.0
    owners, done = {}, 0.0
    for name, size in sizes.items():
        # the run a module falls in is where its midpoint lies along the cumulative size
        owners[name] = min(int((done + size / 2.0) / total * processes), processes - 1)
        done += size
    return owners


def owned(owners: Optional[Dict[str, int]], names: Iterable[str], rank: int) -> list:
    """The modules of ``names`` that ``rank`` owns (all of them when nothing is sharded: ``owners`` is None)."""
    return [m for m in names if owners is None or owners[m] == rank]


def reshard_all(model: nn.Module) -> None:
    """Every FSDP2 unit of the sharded ``model`` (the root of its ``fully_shard`` calls) back to its shards, with
    FSDP's per-iteration state reset: a forward stopped by an exception, or a backward that stopped at the outputs,
    leaves the units it gathered gathered (the root's embedding and head among them) and their state mid-way, where
    a plain ``reshard`` does nothing. ``FSDPModule.reset_iter_state`` (torch 2.13) is FSDP's own recovery from an
    aborted iteration. A torch without it gets a per-unit ``reshard``, which leaves the units stopped mid-forward
    gathered: more memory, the same results. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return
    if hasattr(model, "reset_iter_state"):
        model.reset_iter_state()
        return
    for module in model.modules():  # pragma: no cover - torch < 2.13
        if isinstance(module, FSDPModule):
            module.reshard()


def _plain_class(module: nn.Module) -> type:
    """The class ``fully_shard`` derived ``module``'s from (``FSDPLlamaDecoderLayer`` -> ``LlamaDecoderLayer``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(block: nn.Module, config, index: int) -> nn.Module:
    """A plain copy of the sharded ``block`` (the ``index``-th of a model of ``config``), built by its own class
    on the meta device and given the gathered weights (``DTensor.full_tensor``: every process must call this for
    the same block) and the block's buffers. The copy is what any block is to the pruning code; the sharded block
    is left as it was."""
    cls = _plain_class(block)
    params = inspect.signature(cls.__init__).parameters
    with torch.device("meta"):
        copy = cls(config, **({"layer_idx": index} if "layer_idx" in params else {}))
    copy.train(block.training)
    targets = dict(copy.named_modules())
    for prefix, module in block.named_modules():
        target = targets.get(prefix)
        if target is None:
            raise ValueError(f"block {index}: {type(copy).__name__} built from the config has no {prefix!r}; spam-hf "
                             "prunes a sharded model whose blocks are as its config builds them")
        for name, p in module.named_parameters(recurse=False):
            full = p.detach().full_tensor() if is_sharded(p) else p.detach().clone()
            expected = getattr(target, name).shape
            if full.shape != expected:
                raise ValueError(f"block {index}: {prefix}.{name} is {tuple(full.shape)}, its config builds "
                                 f"{tuple(expected)}; spam-hf prunes a sharded model whose blocks are as its config "
                                 "builds them (not an already pruned one)")
            target._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
        for name, b in module.named_buffers(recurse=False):
            target._buffers[name] = b.detach().clone()
    left = [n for n, t in list(copy.named_parameters()) + list(copy.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"block {index}: the sharded block has no {left[0]!r} to copy")
    return copy


def reshard(block: nn.Module, like: nn.Module, distributed_config=None) -> nn.Module:
    """``block`` (plain) sharded in place by FSDP2 as ``like`` was: the mesh of its weights, and the CPU-offload
    and mixed-precision policies transformers applies for ``distributed_config`` (``fsdp_cpu_offload``,
    ``fsdp_mixed_precision``); its weights are then each process's rows only."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = next(p for p in like.parameters() if is_sharded(p)).device_mesh
    policies = {}
    if getattr(distributed_config, "fsdp_cpu_offload", False):
        policies["offload_policy"] = CPUOffloadPolicy()
    if getattr(distributed_config, "fsdp_mixed_precision", False):
        policies["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(block, mesh=mesh, reshard_after_forward=True, **policies)
    return block


@contextlib.contextmanager
def gathered_block(model: nn.Module, layers: nn.ModuleList, index: int, changed: bool = True) -> Iterator[nn.Module]:
    """Inside: ``layers[index]`` of the sharded ``model`` is a plain copy with the whole block's weights
    (:func:`unsharded_copy`), so code that reads and replaces modules by name (scores, compensation, surgery) works
    on it. After: with ``changed``, the main process's copy (refitted and cut) goes to every process and is sharded
    in place (:func:`reshard`); without, the sharded block is put back. Only this block is ever gathered."""
    block = layers[index]
    if not any(is_sharded(p) for p in block.parameters()):
        yield block
        return
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers[index] = unsharded_copy(block, text_config, index)
    try:
        yield layers[index]
    except BaseException:
        layers[index] = block
        raise
    if not changed:
        layers[index] = block
        return
    current = layers[index]
    broadcast_parameters(current)  # every process takes its rows of the same (the main process's) weights
    reshard(current, block, getattr(model.config, "distributed_config", None))
    release_shards(block)


def release_shards(block: nn.Module) -> None:
    """Free the storage of the shards of ``block``, a sharded block just replaced in its model: the root FSDP unit
    keeps a reference to every unit it initialised, so without this each process would keep its rows of every
    unpruned block to the end. The block must not be run again (FSDP reads nothing of a unit that does not run).
    Shards that are views of a memory-mapped checkpoint (as transformers loads them) are file pages the system
    reclaims by itself, and are left as they are."""
    with torch.no_grad():
        for p in block.parameters():
            if is_sharded(p):
                storage = p.to_local().untyped_storage()
                if storage.resizable():
                    storage.resize_(0)
