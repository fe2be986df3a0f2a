"""Pruning block by block in one process, data parallel on unsharded copies, and where an FSDP2-sharded model is:
wall time and what each process holds.

The model is a random-weight LLaMA-layout decoder with the widths of a published one (``--shape``, default
Qwen2.5-0.5B: hidden 896, MLP 4864, 14 query / 2 KV heads, vocabulary 151936) and ``--layers`` blocks (default
16; ``--vocab`` replaces its vocabulary, e.g. 32,000 as Llama-2's and Mistral-7B's, where the blocks weigh more
than the embedding), fp32, saved once and loaded by every run. Each run prunes ``--sparsity`` (default 0.5) of its
heads and neurons block by block (:func:`spam_hf.pruning.prune`, ``damage-obs`` with least-squares compensation,
the default score) from ``--calibration-batches`` (default 4) global batches of ``--batch-size`` × ``--seq-len``
random token ids (default 4 × 128), split over the processes:

* ``one``: one process, the whole model;
* ``unsharded``: ``--processes`` processes (torchrun, gloo), each holding the whole model (what ``compress --fsdp2``
  did before pruning learnt to work on the sharded model, and still does for choices that need every block at once);
* ``fsdp2``: as many processes, the model sharded by FSDP2 at load (``DistributedConfig(fsdp_size=P)``) and pruned
  where it is: one block at a time gathered, cut and sharded again.

On a CPU the cores are split over the processes (``OMP_NUM_THREADS``). Per process: the wall time of ``prune``, the
peak resident memory (``ru_maxrss``) after the imports, after loading and after pruning, the peak of the pass that
runs the whole model (the output factors: one forward and backward per sequence, where FSDP2 gathers each unit, the
embedding and the head included) and of the block-by-block passes after it (Linux ``VmHWM``, reset in between), and
the bytes of the weights it holds before and after. ``kept_equal_vs_unsharded`` says whether FSDP2 kept the groups the unsharded processes
kept (the same calibration shards per process), ``logits_max_diff_vs_unsharded`` compares the pruned models.

    python benchmarks/sharded_pruning.py --out benchmarks/results/sharded_pruning_cpu.json
    python benchmarks/sharded_pruning.py --vocab 32000 --out benchmarks/results/sharded_pruning_v32k_cpu.json
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

from scale import SHAPES  # noqa: E402  (benchmarks/ is the script's folder)
from scaling_out import chosen_configs, run_workers  # noqa: E402

CONFIGS = ("one", "unsharded", "fsdp2")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (split over the processes)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "sharded_pruning"))
    p.add_argument("--out", default=None, help="JSON results (printed either way)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def peak_rss() -> float:
    return gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def high_water() -> float:
    """The process's peak resident memory since the last :func:`reset_high_water` (``VmHWM``), GiB."""
    with open("/proc/self/status") as f:
        return gib(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024)


def reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
        f.write("5")


def worker(a) -> None:
    """One process of a run: loads, prunes, writes ``WORK/<config>/rank<r>.json`` (the main process also the
    pruned model's logits on a fixed batch)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spam_hf.distributed import rank, shutdown
    from spam_hf.pruning import prune, sequential
    from spam_hf.sharding import local_rows

    imported = peak_rss()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    kw = {}
    if a.worker == "fsdp2":
        from transformers.distributed import DistributedConfig

        kw["distributed_config"] = DistributedConfig(fsdp_size=processes)
    elif processes > 1:
        torch.distributed.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(os.path.join(a.work_dir, "model"), **kw)

    def held() -> float:
        return gib(sum(local_rows(p)[0].numel() * p.element_size() for p in model.parameters()))

    loaded, weights_before = peak_rss(), held()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.calibration_batches, a.batch_size, a.seq_len), generator=g)
    per, r = a.batch_size // processes, rank()
    batches = [{"input_ids": b[r * per:(r + 1) * per], "attention_mask": torch.ones_like(b[r * per:(r + 1) * per]),
                "labels": b[r * per:(r + 1) * per].clone()} for b in ids]
    phases = {}
    factors = sequential.output_factors

    def timed_factors(*args, **kwargs):  # the peak of the output-factor pass (the only whole-model forwards)
        out = factors(*args, **kwargs)
        phases["peak_rss_output_factors_gib"] = high_water()
        reset_high_water()
        return out

    sequential.output_factors = timed_factors
    reset_high_water()
    t0 = time.perf_counter()
    result = prune(model, None, calibration=batches, sparsity=a.sparsity, method="damage-obs", compensate=True,
                   sequential=True, calibration_batches=a.calibration_batches)
    wall = time.perf_counter() - t0
    out = {"rank": r, "wall_s": round(wall, 1), "peak_rss_after_imports_gib": imported,
           "peak_rss_after_load_gib": loaded, "peak_rss_gib": peak_rss(), **phases,
           "peak_rss_blocks_gib": high_water(), "weights_before_gib": weights_before,
           "weights_after_gib": held(), "achieved": round(result.achieved, 4),
           "kept": {k: v.tolist() for k, v in result.selection.keep.items()}}
    with torch.no_grad():  # every process: a sharded model's forward gathers each block from all of them
        logits = model.eval()(input_ids=ids[0, :1, :32]).logits
    folder = os.path.join(a.work_dir, a.worker)
    with open(os.path.join(folder, f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    if r == 0:
        torch.save(logits, os.path.join(folder, "logits.pt"))
    shutdown()


def run(config: str, a) -> dict:
    processes = 1 if config == "one" else a.processes
    ranks = run_workers(__file__, config, processes, os.path.join(a.work_dir, config))
    if any(r["kept"] != ranks[0]["kept"] for r in ranks):
        raise SystemExit(f"{config}: the processes kept different groups")
    return {"processes": processes, "per_process": [{k: v for k, v in r.items() if k != "kept"} for r in ranks],
            "kept": ranks[0]["kept"], "achieved": ranks[0]["achieved"],
            "wall_s": max(r["wall_s"] for r in ranks),
            "max_peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
            "max_peak_rss_output_factors_gib": max(r["peak_rss_output_factors_gib"] for r in ranks),
            "max_peak_rss_blocks_gib": max(r["peak_rss_blocks_gib"] for r in ranks),
            "max_weights_before_gib": max(r["weights_before_gib"] for r in ranks),
            "max_weights_after_gib": max(r["weights_after_gib"] for r in ranks)}


def summarise(res: dict, work_dir: str) -> None:
    """Ratios against the one-process run, in place; FSDP2's groups and logits against the unsharded processes'."""
    import torch

    runs = res["runs"]
    base = runs["one"]
    for r in runs.values():
        for key in ("wall_s", "max_peak_rss_gib", "max_peak_rss_output_factors_gib", "max_peak_rss_blocks_gib",
                    "max_weights_before_gib"):
            if base[key]:
                r[key.replace("max_", "") + "_ratio"] = round(r[key] / base[key], 3)
    if "fsdp2" in runs and "unsharded" in runs:
        runs["fsdp2"]["kept_equal_vs_unsharded"] = runs["fsdp2"]["kept"] == runs["unsharded"]["kept"]
        logits = {c: torch.load(os.path.join(work_dir, c, "logits.pt")) for c in ("fsdp2", "unsharded")}
        runs["fsdp2"]["logits_max_diff_vs_unsharded"] = float((logits["fsdp2"] - logits["unsharded"]).abs().max())
        runs["fsdp2"]["peak_vs_unsharded"] = round(runs["fsdp2"]["max_peak_rss_gib"]
                                                   / runs["unsharded"]["max_peak_rss_gib"], 3)
    for r in runs.values():
        r.pop("kept")


def main() -> None:
    a = parse()
    a.work_dir = os.path.abspath(a.work_dir)
    if a.worker:
        worker(a)
        return
    configs = chosen_configs(a.configs, CONFIGS)
    # the model is made in a child process: a process started from this one would inherit its peak memory
    make = (f"import torch; from transformers import LlamaForCausalLM; from scale import llama_config; "
            f"torch.manual_seed(0); c = llama_config({a.shape!r}, {a.layers}, {a.seq_len}); "
            f"c.vocab_size = {a.vocab} or c.vocab_size; "
            f"LlamaForCausalLM(c).save_pretrained({os.path.join(a.work_dir, 'model')!r})")
    subprocess.run([sys.executable, "-c", make], check=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(
        os.path.abspath(__file__))))
    res = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "args": vars(a), "runs": {}}
    for cfg in configs:
        res["runs"][cfg] = run(cfg, a)
        print(cfg, json.dumps({k: v for k, v in res["runs"][cfg].items() if k not in ("per_process", "kept")}),
              flush=True)
    summarise(res, a.work_dir)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "per_process"} for k, r in res["runs"].items()},
                     indent=2))


if __name__ == "__main__":
    main()
