"""What a model costs: parameters (total and prunable), forward FLOPs, measured latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .architectures import group_specs
from .pruning.selection import prunable_cost


def model_costs(model: nn.Module, seq_len: int = 128) -> Dict[str, float]:
    """``params`` (all), ``block_params`` (prunable modules, weights + biases) and ``block_flops``
    (forward FLOPs per sequence of ``seq_len`` in those modules and their attention)."""
    specs = group_specs(model)
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "block_params": prunable_cost(model, specs, "params", seq_len) if specs else 0.0,
        "block_flops": prunable_cost(model, specs, "flops", seq_len) if specs else 0.0,
        "seq_len": seq_len,
    }


def latency_ids(config, batch_size: int, seq_len: int, vocab_low: int = 1000) -> torch.Tensor:
    """Random full-length ``input_ids [batch_size, seq_len]`` (seed 0) for a model of ``config``: ids from
    ``[vocab_low, vocab_size)`` (past the special tokens), ``seq_len`` clipped to the model's positions."""
    vocab = int(getattr(config, "vocab_size", 30000))
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(seq_len, int(max_pos)) if max_pos else seq_len
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(vocab_low, vocab - 1), vocab, (batch_size, seq_len), generator=g)


def _latency_inputs(model: nn.Module, batch_size: int, seq_len: int, vocab_low: int = 1000):
    """:func:`latency_ids` and an all-ones mask on the model's device."""
    ids = latency_ids(model.config, batch_size, seq_len, vocab_low).to(next(model.parameters()).device)
    return ids, torch.ones_like(ids)


def _time_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _eval_with_threads(models, threads: Optional[int]):
    """Eval mode and ``torch.set_num_threads(threads)`` for the block; both restored afterwards."""
    modes = [m.training for m in models]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for m in models:
            m.eval()
        yield old_threads
    finally:
        torch.set_num_threads(old_threads)
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 128, repeats: int = 10, warmup: int = 2,
                    threads: Optional[int] = None, vocab_low: int = 1000) -> Dict[str, float]:
    """Median wall time of a forward pass (warm), in seconds, on random full-length inputs.

    Args:
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); CPU only.
    """
    ids, mask = _latency_inputs(model, batch_size, seq_len, vocab_low)
    with _eval_with_threads([model], threads) as old_threads:
        times = [_time_forward(model, ids, mask) for _ in range(warmup + repeats)][warmup:]
    median = statistics.median(times)
    return {"latency_s": median, "throughput_seq_per_s": batch_size / median, "batch_size": batch_size,
            "seq_len": ids.shape[1], "repeats": repeats, "threads": threads or old_threads}


def _quartiles(x: List[float]) -> Tuple[float, float, float]:
    q = statistics.quantiles(x, n=4, method="inclusive") if len(x) > 1 else [x[0]] * 3
    return q[0], statistics.median(x), q[2]


def interleaved_speedup(run_dense: Callable[[], object], run_pruned: Callable[[], object], repeats: int = 7,
                        warmup: int = 1, max_spread: float = 0.2) -> Dict[str, float]:
    """Two forwards timed *interleaved* (``dense, pruned`` then ``pruned, dense``, …), so that load from other
    work hits both alike. Per repeat the speed-up ``t_dense / t_pruned``; returned: each one's median time, the
    speed-up's median and quartiles, and ``trusted = (q75 − q25) / median ≤ max_spread`` (when False the machine
    was too noisy for the number to mean much). ``run_*`` run one forward and return when it has finished."""
    td: List[float] = []
    tp: List[float] = []
    for i in range(warmup + repeats):
        order = ((run_dense, td), (run_pruned, tp)) if i % 2 == 0 else ((run_pruned, tp), (run_dense, td))
        for run, times in order:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    td, tp = td[warmup:], tp[warmup:]
    q25, med, q75 = _quartiles([a / b for a, b in zip(td, tp)])
    return {"dense_s": statistics.median(td), "pruned_s": statistics.median(tp), "speedup": med,
            "speedup_q25": q25, "speedup_q75": q75, "trusted": (q75 - q25) / med <= max_spread, "repeats": repeats}


@torch.no_grad()
def compare_latency(dense: nn.Module, pruned: nn.Module, batch_size: int = 32, seq_len: int = 128, repeats: int = 7,
                    warmup: int = 1, threads: Optional[int] = None, max_spread: float = 0.2) -> Dict[str, float]:
    """Dense and pruned PyTorch models timed by :func:`interleaved_speedup` on the same full-length random batch;
    adds ``batch_size``, ``seq_len`` and ``threads`` to its result."""
    ids, mask = _latency_inputs(dense, batch_size, seq_len)
    with _eval_with_threads([dense, pruned], threads) as old_threads:
        res = interleaved_speedup(lambda: _time_forward(dense, ids, mask), lambda: _time_forward(pruned, ids, mask),
                                  repeats, warmup, max_spread)
    return {**res, "batch_size": batch_size, "seq_len": ids.shape[1], "threads": threads or old_threads}

