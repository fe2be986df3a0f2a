"""Peak memory of each stage of a ``compress`` job, predicted from the model's shapes alone.

Works on a model built on the ``meta`` device (no weights): only parameter shapes, dtypes and the group specs are
read. Every figure is bytes; a stage's peak is what it holds at its fullest moment, on top of the process itself
(:data:`PROCESS_BYTES`). Notation: ``P`` the weights, ``H`` the hidden width, ``V`` the vocabulary, ``t`` tokens
per batch (``batch × length``), ``d_max`` the widest input of a consuming module (down's ``intermediate + 1``).

* **training** (``spam``): ``P`` + gradients and Adam moments of the trained parameters (4 + 8 bytes each,
  fp32) + the curvature sums of every prunable module (KFAC ``4·Σ[(in+1)² + out²]``, with ``d`` instead of
  ``d²`` for a factor of ``diagonal_from`` or more, which keeps its diagonal; diagonal ``4·Σ out·(in+1)``)
  + the activations of one batch with gradients + its logits (``3·4·t·V`` for a causal LM: logits, their
  gradient, the sampled-loss softmax) + a prior update's float64 eigendecomposition of the widest factor kept
  whole (``3·8·d²``). ``plain`` training has no curvature and no prior update.
* **statistics** (pruning after training), all at once: ``P`` + the calibration posterior's factors in fp32
  and their float64 copies (``12·Σ[(in+1)² + out²]`` over the consuming modules for the damage scores, over
  every module otherwise) + one calibration batch with gradients + the scoring transient of the widest module
  (``2·8·d_max²``: damped copy, Cholesky factor and inverse, two at a time, plus ``4·8·out·d_max`` of weight
  slices).
  Block by block (``--sequential``): ``P`` + the output factors of every consuming module (``4·Σ out²``) + the
  output-gradient pass (one sequence with gradients and its logits) + one block's pass (its
  input factors, ``4·Σ(in+1)²``, the scoring transient in float32, the hidden states of every calibration token
  at one block boundary twice, ``2·4·T·H``, and one batch through the block), all in float32 on the model's
  device.
* **evaluate**: ``P`` + one evaluation batch's logits (``2·4·t·V``) and its activations without gradients.
* **export**: ``P`` + the largest tensor (written shard by shard), + ``P`` again when the latency of the dense
  model is measured beside the pruned one.

Activations per token and layer are estimated as ``8·H + 5·I`` floats with gradients (what a LLaMA block saves:
norm inputs and outputs, Q/K/V before and after rotary, attention output, residuals; gate, up, the activation,
their product and down's input) and ``3·I`` without (the MLP's live intermediates). The passes of one stage are
added, not maxed: the resident memory a process reaches (what ``ru_maxrss`` and an out-of-memory kill see) keeps
what the allocator cached from the earlier pass. ``benchmarks/scale.py --cli`` measures the peaks these formulas
predict (docs/large-models.md: within 7% on the Llama-3.2-1B shape, 16 and 4 layers, block by block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import nn

from .architectures import consuming_modules, get_family, group_specs, prunable_modules
from .architectures.base import lookup_linear
from .curvature import DIAGONAL_FROM, kept_diagonal

GIB = 2 ** 30
PROCESS_BYTES = int(0.45 * GIB)
"""Resident memory of the Python process with torch and transformers imported, before any model is loaded."""
FLOAT = 4
DOUBLE = 8


@dataclass
class Stage:
    """One stage's predicted peak (``bytes``, the process included) and what it is made of."""

    name: str
    bytes: int
    parts: Dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class Shape:
    """The widths a prediction needs, read from the model."""

    weights: int  # bytes of every parameter
    trainable: int  # parameters that training updates
    largest_tensor: int  # bytes
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linear: Dict[str, tuple]  # prunable module -> (out, in + bias column)
    consuming: List[str]


def shape_of(model: nn.Module, kv_groups_only: bool = False) -> Shape:
    """The widths of ``model`` (real or on the ``meta`` device)."""
    specs = group_specs(model, kv_groups_only)
    mods = dict(model.named_modules())
    linear = {}
    for m in prunable_modules(specs):
        fan_in, fan_out, bias = lookup_linear(mods, m, "memory")
        linear[m] = (fan_out, fan_in + int(bias))
    consuming = consuming_modules(specs)
    params = list(model.parameters())
    config = getattr(model, "config", None)
    hidden = max((linear[m][0] for m in consuming), default=0)
    intermediate = max((linear[m][1] - 1 for m in consuming), default=0)
    return Shape(weights=sum(p.numel() * p.element_size() for p in params),
                 trainable=sum(p.numel() for p in params if p.requires_grad),
                 largest_tensor=max((p.numel() * p.element_size() for p in params), default=0),
                 layers=len(get_family(model).layers(model)), hidden=hidden, intermediate=intermediate,
                 vocab=int(getattr(config, "vocab_size", 0) or 0), linear=linear, consuming=consuming)


def kfac_floats(shape: Shape, modules: List[str]) -> int:
    """``Σ (in+1)² + out²`` over ``modules``: the numbers of their Kronecker factors."""
    return sum(shape.linear[m][1] ** 2 + shape.linear[m][0] ** 2 for m in modules)


def training_kfac_floats(shape: Shape, diagonal_from: Optional[int]) -> int:
    """The numbers of the training curvature's KFAC sums: ``d²`` per factor of width ``d``, or ``d`` where
    ``d ≥ diagonal_from`` (the factor keeps its diagonal, :func:`~spam_hf.curvature.kept_diagonal`)."""
    return sum(d if kept_diagonal(d, diagonal_from) else d * d for dims in shape.linear.values() for d in dims)


def _activations(shape: Shape, tokens: int, grad: bool) -> int:
    per_token = (8 * shape.hidden + 5 * shape.intermediate) * shape.layers if grad else 3 * shape.intermediate
    return FLOAT * tokens * per_token


def _scoring_transient(shape: Shape, modules: List[str], itemsize: int = DOUBLE) -> int:
    widest = max(modules, key=lambda m: shape.linear[m][1])
    out, d = shape.linear[widest]
    return itemsize * (2 * d * d + 4 * out * d)


def predict(model: nn.Module, *, training: str = "spam", curvature: str = "kfac", sequential: bool = False,
            consuming_only: bool = True, batch_size: int = 8, seq_len: int = 128, calibration_batches: int = 32,
            eval_batch_size: int = 8, causal_lm: Optional[bool] = None, measure_latency: bool = True,
            kv_groups_only: bool = False, diagonal_from: Optional[int] = DIAGONAL_FROM) -> List[Stage]:
    """The predicted peak of every stage of ``compress`` (module docstring), in order.

    Args:
        training: ``spam``, ``plain`` or ``none`` (no training stage).
        curvature: ``kfac`` or ``diag`` (SpaM training's curvature sums).
        sequential: block-by-block statistics (``--sequential``), else all at once.
        consuming_only: the pruning score reads the consuming modules' statistics alone (the damage scores).
        causal_lm: logits over the vocabulary per token (default: the model's class name says so).
        diagonal_from: training's KFAC factors at least this wide keep their diagonal (``--kfac_diagonal_from``;
            ``None`` or 0: all whole).
    """
    s = shape_of(model, kv_groups_only)
    if causal_lm is None:
        causal_lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    t = batch_size * seq_len
    logits = FLOAT * (s.vocab if causal_lm else 8)
    all_modules = list(s.linear)
    stages: List[Stage] = []
    if training != "none":
        parts = {"weights": s.weights, "gradients + Adam": 12 * s.trainable,
                 "activations": _activations(s, t, True), "logits": 3 * t * logits}
        if training == "spam":
            parts["curvature sums"] = FLOAT * (training_kfac_floats(s, diagonal_from) if curvature == "kfac" else
                                              sum(o * i for o, i in s.linear.values()))
            whole = [d for dims in s.linear.values() for d in dims if not kept_diagonal(d, diagonal_from)]
            parts["prior update"] = 3 * DOUBLE * max(whole, default=0) ** 2 if curvature == "kfac" else 0
        stages.append(Stage("training", PROCESS_BYTES + sum(parts.values()), parts))
    modules = s.consuming if consuming_only or sequential else all_modules
    if sequential:
        g_pass = _activations(s, seq_len, True) + 3 * seq_len * logits
        block = (FLOAT * sum(s.linear[m][1] ** 2 for m in s.consuming[:2]) + _scoring_transient(s, s.consuming, FLOAT)
                 + 2 * FLOAT * calibration_batches * t * s.hidden + 3 * FLOAT * t * s.intermediate)
        parts = {"weights": s.weights, "output factors": FLOAT * sum(s.linear[m][0] ** 2 for m in modules),
                 "gradient pass": g_pass, "one block": block}
        note = "block by block"
    else:
        parts = {"weights": s.weights, "factors": (FLOAT + DOUBLE) * kfac_floats(s, modules),
                 "calibration batch": _activations(s, t, True) + 3 * t * logits,
                 "scoring": _scoring_transient(s, modules)}
        note = "all at once" + (" (consuming modules)" if modules is s.consuming else "")
    stages.append(Stage("statistics", PROCESS_BYTES + sum(parts.values()), parts, note))
    parts = {"weights": s.weights, "logits": 2 * eval_batch_size * seq_len * logits,
             "activations": _activations(s, eval_batch_size * seq_len, False)}
    stages.append(Stage("evaluate", PROCESS_BYTES + sum(parts.values()), parts))
    parts = {"weights": s.weights, "largest tensor": s.largest_tensor,
             "dense copy for latency": s.weights if measure_latency else 0}
    stages.append(Stage("export", PROCESS_BYTES + sum(parts.values()), parts))
    return stages


def available_bytes(device) -> int:
    """Memory free for new tensors on ``device``: the accelerator's free memory, or the host's available memory
    (``MemAvailable`` of ``/proc/meminfo``; the physical memory where that file does not exist)."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak(stages: List[Stage]) -> int:
    return max(st.bytes for st in stages)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"
