"""What a model costs: parameters (total and prunable), forward FLOPs, measured latency."""

from __future__ import annotations

import statistics
import time
from typing import Dict, Optional

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


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 128, repeats: int = 10, warmup: int = 2,
                    threads: Optional[int] = None, vocab_low: int = 1000) -> Dict[str, float]:
    """Median wall time of a forward pass (warm), in seconds, on random full-length inputs.

    Args:
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); CPU only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 30000))
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(seq_len, int(max_pos)) if max_pos else seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(vocab_low, vocab - 1), vocab, (batch_size, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    median = statistics.median(times)
    return {"latency_s": median, "throughput_seq_per_s": batch_size / median, "batch_size": batch_size,
            "seq_len": seq_len, "repeats": repeats, "threads": threads or old_threads}

