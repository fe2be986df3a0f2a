"""ONNX export of any spam-hf export or stock checkpoint, checked against PyTorch with ONNX Runtime.

The model is loaded with :func:`spam_hf.export.from_pretrained` (spam-hf's own copy of the runtime modules, so a
non-uniform export needs no ``trust_remote_code``) and traced by ``torch.onnx.export(dynamo=True)`` with batch and
sequence as dynamic axes. The graph holds the pruned shapes themselves: uneven heads, empty attention blocks and
gathered KV heads become ordinary ONNX ops, and ONNX Runtime needs nothing from spam-hf.

Inputs are the tokenizer's ``model_input_names`` that the model's ``forward`` takes (``input_ids``,
``attention_mask``, ``token_type_ids``); the one output is ``logits`` (a model with a head) or
``last_hidden_state`` (a bare encoder). Decoders are exported without a KV cache (``use_cache=False``): one
forward over the whole sequence, for scoring, classification or embeddings.

Before the folder is written, ONNX Runtime runs a padded batch of real sentences (the packaged SST-2 sample, a
different batch size and length than the trace) and its output must equal PyTorch's at every position that is not
padding, to ``atol`` (1e-4 by default).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..architectures import get_family
from .folders import check_output_dir, staged_folder
from .save import from_pretrained

logger = logging.get_logger(__name__)

ONNX_FILE = "model.onnx"
REPORT_FILE = "onnx_export.json"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: files of which a checkpoint folder with a tokenizer has at least one
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote (also saved as ``onnx_export.json`` beside the graph)."""

    path: str  # the .onnx file
    source: str  # MODEL_DIR
    model_class: str
    inputs: List[str]
    output: str
    opset: int
    max_abs_diff: float  # ONNX Runtime vs PyTorch on the check batch, padding positions left out
    atol: float
    check_batch: List[int]  # [batch, sequence] of the check batch
    versions: Dict[str, str]


def require_onnx() -> None:
    """Fail with one line naming the extra when onnx / onnxscript / onnxruntime are missing."""
    import importlib.util

    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install 'spam-hf[onnx]'")


def _load(model_dir: str) -> Tuple[nn.Module, Optional[object]]:
    """The model in ``model_dir`` (float32, eval) and its tokenizer (``None`` when the folder has none)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
            raise ValueError(f"{model_dir} is a LoRA adapter; export a full model (compress with --lora-merge True "
                             f"writes model-merged/, or merge with peft's merge_and_unload and save)")
        raise ValueError(f"{model_dir} has no config.json; give a checkpoint folder")
    model = from_pretrained(model_dir).float().eval()
    get_family(model).prepare(model)  # a stock mixture of experts' loop over the experts a batch hits does not trace
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return model, None  # without its files AutoTokenizer may build an empty tokenizer of the model type's class
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def input_names(model: nn.Module, tokenizer=None) -> List[str]:
    """The graph's inputs: those of :data:`INPUT_ORDER` that the tokenizer's ``model_input_names`` (default
    ``input_ids, attention_mask``) name and ``model.forward`` accepts, in that order."""
    wanted = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_ORDER if n in wanted and n in accepted]
    if "input_ids" not in names:
        raise ValueError(f"{type(model).__name__}.forward takes no input_ids; only text models are exported")
    return names


class _Traced(nn.Module):
    """``model`` as a function of tensors only: ``forward(*inputs) -> logits`` (or ``last_hidden_state``)."""

    def __init__(self, model: nn.Module, names: Sequence[str], output: str):
        super().__init__()
        self.model, self.names, self.output = model, list(names), output
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kwargs = {n: given[n] for n in self.names}
        if self.no_cache:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.output)


def output_name(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> str:
    """``logits`` when the model's output has them, else ``last_hidden_state``."""
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return name
    raise ValueError(f"{type(model).__name__} returns neither logits nor last_hidden_state")


def sample_batch(model: nn.Module, tokenizer, names: Sequence[str], batch: int, max_length: int,
                 offset: int = 0) -> Dict[str, torch.Tensor]:
    """``batch`` real sentences (the packaged SST-2 sample from row ``offset``), padded to the longest and cut at
    ``max_length`` tokens (at most the model's positions); random token ids with a padded tail when there is no
    tokenizer."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(max_length, int(positions)) if positions else max_length
    if tokenizer is not None:
        from ..data import packaged_sst2_files

        with open(packaged_sst2_files()[1]) as f:
            rows = [line.split("\t")[0] for line in f][1 + offset:1 + offset + batch]
        if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS for this batch only
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc.setdefault("attention_mask", torch.ones_like(enc["input_ids"]))
        enc.setdefault("token_type_ids", torch.zeros_like(enc["input_ids"]))
        return {n: enc[n] for n in names}
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(offset)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, max_length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, max_length - max_length // 4:] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: out[n] for n in names}


def _positions(reference: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """Boolean index of the entries to compare: all of a ``[batch, classes]`` output; of a ``[batch, seq, ...]``
    output the positions whose ``attention_mask`` is 1 (padding positions hold whatever the kernels leave there)."""
    if mask is None or reference.ndim < 2 or reference.shape[:2] != mask.shape:
        return np.ones(reference.shape, dtype=bool)
    keep = mask.astype(bool)
    return np.broadcast_to(keep.reshape(keep.shape + (1,) * (reference.ndim - 2)), reference.shape)


def max_difference(session, traced: nn.Module, batch: Dict[str, torch.Tensor]) -> float:
    """``max |ONNX Runtime − PyTorch|`` over the non-padding entries of ``batch``'s output."""
    with torch.no_grad():
        reference = traced(**batch).numpy()
    got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    if got.shape != reference.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from PyTorch's {reference.shape}")
    mask = batch.get("attention_mask")
    where = _positions(reference, None if mask is None else mask.numpy())
    return float(np.abs(got - reference)[where].max())


def graph_opset(path: str) -> int:
    """The default-domain opset the ``.onnx`` file at ``path`` declares."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def ort_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads, which then sleep when idle; ``None``:
    ONNX Runtime's defaults)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle threads sleep instead of spinning, so that two sessions timed in turn do not slow each other down
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes that concern no user (torchvision ops it skips, pytree deprecations, axis renames) off
    while it runs; its errors still raise."""
    import logging as std_logging

    log = std_logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(std_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _check_paths(model_dir: str, output_dir: str, overwrite: bool) -> None:
    if not os.path.isdir(model_dir):
        raise ValueError(f"model dir {model_dir!r} does not exist")
    src, dst = os.path.realpath(model_dir), os.path.realpath(output_dir)
    if dst == src or src.startswith(dst + os.sep):  # writing there would delete the model being exported
        raise ValueError(f"--output-dir {output_dir!r} holds MODEL_DIR {model_dir!r}; choose another folder")
    check_output_dir(output_dir, overwrite)


def export_onnx(model_dir: str, output_dir: str, opset: int = 18, atol: float = 1e-4,
                overwrite: bool = False) -> OnnxExport:
    """Write ``output_dir/model.onnx`` (its weights in ``model.onnx.data`` beside it), ``config.json``, the
    tokenizer and ``onnx_export.json`` for the checkpoint in ``model_dir``.

    The graph is traced on a ``[2, 16]`` batch with batch and sequence dynamic, then checked on a ``[5, ≤ 48]``
    padded batch of real sentences: ``max |ORT − PyTorch| ≤ atol`` over non-padding positions, or nothing is
    written (``ValueError``). The folder appears in one rename, so an interrupted export leaves no half folder.
    """
    if opset < 18:
        raise ValueError(f"--opset must be >= 18 (torch's ONNX exporter writes no older opset), got {opset}")
    if not atol > 0:
        raise ValueError(f"--atol must be > 0, got {atol}")
    require_onnx()
    _check_paths(model_dir, output_dir, overwrite)
    model, tokenizer = _load(model_dir)
    names = input_names(model, tokenizer)
    trace_batch = sample_batch(model, tokenizer, names, batch=2, max_length=16)
    if trace_batch["input_ids"].shape[1] < 2:
        raise ValueError("the tokenizer gives sequences of one token; cannot trace a dynamic sequence axis")
    output = output_name(model, trace_batch)
    traced = _Traced(model, names, output).eval()
    check = sample_batch(model, tokenizer, names, batch=5, max_length=48, offset=2)
    dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    logger.info(f"export: tracing {type(model).__name__} ({', '.join(names)} -> {output}) to ONNX opset {opset}")
    with staged_folder(output_dir) as stage:
        path = os.path.join(stage, ONNX_FILE)
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(traced, (), kwargs=trace_batch, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=[output], verbose=False,
                                        dynamic_shapes={n: dim for n in names})
        program.save(path, external_data=True)
        opset = graph_opset(path)
        diff = max_difference(ort_session(path), traced, check)
        if not diff <= atol:
            raise ValueError(f"ONNX Runtime's {output} differ from PyTorch's by {diff:.3g} (> atol {atol:g}); "
                             f"nothing written")
        config = model.config.to_dict()
        config.pop("auto_map", None)  # no modeling file travels with the graph; spam_pruning stays as a record
        with open(os.path.join(stage, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        result = OnnxExport(path=os.path.join(output_dir, ONNX_FILE), source=model_dir,
                            model_class=type(model).__name__, inputs=names, output=output, opset=opset,
                            max_abs_diff=diff, atol=atol, check_batch=list(check["input_ids"].shape),
                            versions=_versions())
        with open(os.path.join(stage, REPORT_FILE), "w") as f:
            json.dump(asdict(result), f, indent=2)
    logger.info(f"export: {result.path} (ONNX Runtime vs PyTorch: max |diff| {diff:.2e} on "
                f"{result.check_batch[0]} padded sentences)")
    return result


def compare_onnx_latency(dense_path: str, pruned_path: str, batch_size: int = 32, seq_len: int = 128,
                         repeats: int = 7, warmup: int = 1, threads: Optional[int] = 2) -> Dict[str, float]:
    """Two ``.onnx`` files that :func:`export_onnx` wrote, in ONNX Runtime, timed by
    :func:`spam_hf.costs.interleaved_speedup` on the batch :func:`spam_hf.costs.compare_latency` gives PyTorch
    (:func:`spam_hf.costs.latency_ids` of the ``config.json`` beside the dense graph)."""
    from transformers import AutoConfig

    from ..costs import interleaved_speedup, latency_ids

    dense, pruned = ort_session(dense_path, threads), ort_session(pruned_path, threads)
    ids = latency_ids(AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(dense_path))), batch_size,
                      seq_len).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feed_dense, feed_pruned = ({i.name: feeds[i.name] for i in s.get_inputs()} for s in (dense, pruned))
    res = interleaved_speedup(lambda: dense.run(None, feed_dense), lambda: pruned.run(None, feed_pruned), repeats,
                              warmup)
    return {**res, "batch_size": batch_size, "seq_len": ids.shape[1], "threads": threads}


__all__ = ["OnnxExport", "compare_onnx_latency", "export_onnx", "input_names", "ort_session", "require_onnx"]
