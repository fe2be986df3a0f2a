"""What several processes (``torchrun`` / ``accelerate launch``, data parallel) must agree on.

Each process sees its own shard of every global batch. For the SpaM posterior to be the one of a single
process that sees the whole batch:

* curvature sums, loss sums and row counts are summed over processes before they are used
  (:meth:`spam_hf.curvature.CurvatureAccumulator.all_reduce`), or, for a sharded model (FSDP2,
  :mod:`spam_hf.sharding`), each module's sums onto the one process that owns them (:func:`reduce_to`);
* Monte-Carlo labels are drawn for the *global* rows from the shared generator (identically seeded and
  advanced on every process) and each process takes its slice (:func:`shard_offset`), so a row gets the
  same label whichever process holds it;
* pruning is decided on the main process and broadcast (:func:`broadcast_object`), and only the main
  process writes files.

Every helper is the identity (or a no-op) when ``torch.distributed`` is not initialised or has one process.
"""

from __future__ import annotations

import os
from typing import Any, Tuple

import torch


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def _device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ`` of ``t`` over processes (a new tensor on ``t``'s device; ``t`` itself when single-process)."""
    if not is_distributed():
        return t
    out = t.detach().to(_device()).clone()
    torch.distributed.all_reduce(out)
    return out.to(t.device)


def check_process_count(counted: int) -> None:
    """The processes the launcher started (the process group, or ``WORLD_SIZE`` before there is one) are the
    ``counted`` ones the Trainer splits the data over. accelerate with ``use_cpu: true`` starts several while a
    Trainer without ``use_cpu`` counts one: every process would then train on every batch, and the run still
    finish."""
    launched = torch.distributed.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))
    if launched != counted:
        raise ValueError(f"{launched} processes were launched, but the Trainer counts {counted} and would not split "
                         "the data between them (on a CPU pass --use_cpu True)")


def reduce_to(t: torch.Tensor, dst: int) -> torch.Tensor:
    """``Σ`` of ``t`` over processes on process ``dst`` (a new tensor on ``t``'s device; what the others get back is
    undefined); ``t`` itself when single-process."""
    if not is_distributed():
        return t
    out = t.detach().to(_device()).clone()
    torch.distributed.reduce(out, dst=dst)
    return out.to(t.device)


def shard_offset(n_local: int) -> Tuple[int, int]:
    """``(offset, total)``: where this process's ``n_local`` rows start among the global rows (processes in
    rank order, as the data loader shards a global batch) and how many there are in all. ``(0, n_local)``
    single-process."""
    if not is_distributed():
        return 0, n_local
    counts = [torch.zeros(1, dtype=torch.long, device=_device()) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, torch.tensor([n_local], dtype=torch.long, device=_device()))
    sizes = [int(c.item()) for c in counts]
    return sum(sizes[: rank()]), sum(sizes)


def broadcast_object(obj: Any) -> Any:
    """The main process's ``obj`` on every process (pickled; for small decisions such as a pruning plan)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj``, in rank order (pickled; for small state such as curvature diagonals); ``[obj]``
    single-process."""
    if not is_distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy the main process's parameters and buffers into every process's ``model`` (same shapes), in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.detach().to(_device()).clone()
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


def shutdown(wait: bool = True) -> None:
    """End this process's part in the process group: with ``wait``, first wait at a barrier until every process
    has finished (the main process may still be writing the export), then destroy the group. A no-op when no
    group is initialised.

    Exiting with the group alive can abort a process (SIGABRT, "terminate called without an active
    exception"): Gloo's worker threads still hold tensors when the interpreter is torn down. ``wait=False`` is
    for the error path, where a peer may never reach the barrier."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
