"""Wall time of one ``spam-hf compress`` with 1 process and with ``--processes`` processes (torchrun, DDP).

The same global batch in both (``--batch`` split over the processes), the same data, the default pruning.
Each run is the whole job (tokenising, SpaM training, pruning in rounds with compensation, export) on the
packaged MiniLM with a slice of SST-2; the JSON beside it records the command, wall times, their ratio
and the dev accuracy of both exports.

    python benchmarks/scaling_out.py --train-file ../shared/data/sst2/train.tsv \\
        --dev-file ../shared/data/sst2/dev.tsv --out benchmarks/results/scaling_out_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chosen_configs(spec: str, known: tuple) -> list:
    """``--configs``: the comma-separated subset of ``known`` to run, which must include ``one`` (the baseline)."""
    configs = [c for c in spec.split(",") if c]
    if "one" not in configs or any(c not in known for c in configs):
        raise SystemExit(f"--configs: a subset of {', '.join(known)} that includes 'one' (the baseline)")
    return configs


def run_workers(script: str, config: str, processes: int, folder: str) -> list:
    """Run ``script`` with its command line and ``--worker config``: in one child process, or under torchrun
    (gloo) in ``processes``, the CPU cores split over them; each writes ``folder/rank<r>.json`` (``folder`` is made
    empty first). Returns those records, by rank; a failed run stops the driver with its error's tail."""
    import glob

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    args = [os.path.abspath(script), *sys.argv[1:], "--worker", config]
    cmd = [sys.executable, *args] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)), HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.path.dirname(os.path.abspath(script)))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{config} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, "rank*.json")))]


def run(processes: int, a, out_dir: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    per_process = a.batch // processes
    cli = ["compress", a.model, "--train-file", a.train_file, "--validation-file", a.dev_file,
           "--max-train-samples", str(a.rows), "--sparsity", str(a.sparsity), "--output-dir", out_dir,
           "--per_device_train_batch_size", str(per_process), "--max-seq-length", str(a.max_seq_length), "--num_train_epochs", "1",
           "--measure-latency", "False", "--disable_tqdm", "True", "--seed", "0"]
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "spam_hf.cli"] + cli
    elif processes == 1:
        cmd = [sys.executable, "-m", "spam_hf.cli"] + cli + ["--use_cpu", "True"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "spam_hf.cli"] + cli + \
              ["--use_cpu", "True", "--ddp_backend", "gloo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not torch.cuda.is_available():  # the machine's cores split over the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{res.stderr[-3000:]}")
    report = json.load(open(os.path.join(out_dir, "pruning_report.json")))
    return {"processes": processes, "per_process_batch": per_process, "wall_s": wall,
            "accuracy": report["pruned"].get("accuracy"), "dense_accuracy": report["dense"].get("accuracy"),
            "command": " ".join(cmd)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", required=True)
    p.add_argument("--dev-file", required=True)
    p.add_argument("--model", default="minilm", help="a model spam-hf compress takes (default: the packaged MiniLM)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "scaling_out"))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    machine = f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() \
        else f"CPU, {os.cpu_count()} cores"
    rows = [run(n, a, os.path.join(a.work_dir, f"p{n}")) for n in (1, a.processes)]
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine": machine,
           "runs": rows, "speedup": rows[0]["wall_s"] / rows[1]["wall_s"]}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    for r in rows:
        print(f"{r['processes']} process(es): {r['wall_s']:.1f} s, accuracy {r['accuracy']}")
    print(f"speed-up {res['speedup']:.2f}x")


if __name__ == "__main__":
    main()
