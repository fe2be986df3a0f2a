"""SpaM training in one process, data parallel (DDP) on ``--processes`` and sharded by FSDP2 on as many: wall time
and what each process holds.

The model is a random-weight LLaMA-layout decoder with the widths of a published one (``--shape``, default
Qwen2.5-0.5B: hidden 896, MLP 4864, 14 query / 2 KV heads, vocabulary 151936) and ``--layers`` blocks (default 6),
saved once and loaded by every run (FSDP2 shards it at load: ``from_pretrained(..., distributed_config=
DistributedConfig(fsdp_size=P))``). Each run trains ``--steps`` optimiser steps (default 6) on the same random token
ids with the same global batch (``--batch-size`` × ``--seq-len``, default 4 × 128, split over the processes), fp32,
``SpamTrainer`` with unit priors and KFAC at its defaults, one prior update after ``--burn-in`` steps (default 2);
``fsdp2-plain`` is a plain ``Trainer`` (AdamW) on the same FSDP2 model, what SpaM's own cost under FSDP2 is measured
against. On a CPU the cores are split over the processes (``OMP_NUM_THREADS``).

Per process: the wall time of ``train()``, the peak resident memory (``ru_maxrss``; also before the model is loaded,
after the imports: what torch and transformers alone take), the training state it holds
(its weights, gradients and Adam moments: 4 × its parameters' bytes, a shard of them under FSDP2) and the most
curvature-sum bytes it held after any curvature step. Ratios are against the one-process run of the same invocation;
``log_prior_max_diff_vs_one`` is the largest difference of ``log δ`` from it after training (fp32 round-off, which
unit priors under KFAC amplify: docs/guide.md, "Scaling out"), ``..._vs_ddp`` the same against the DDP run.

    python benchmarks/sharded_training.py --out benchmarks/results/sharded_training_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from scale import SHAPES, llama_config  # noqa: E402  (benchmarks/ is the script's folder)
from scaling_out import chosen_configs, run_workers  # noqa: E402

CONFIGS = ("one", "ddp", "fsdp2", "fsdp2-plain")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4, help="global batch (split over the processes)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--burn-in", type=int, default=2, help="optimiser steps before the one prior update")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "sharded_training"))
    p.add_argument("--out", default=None, help="JSON results (printed either way)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def worker(a) -> None:
    """One process of a run: trains, then writes ``WORK/<config>/rank<r>.json`` (and the priors, main process)."""
    import torch
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from spam_hf import SpamTrainer, SpamTrainingArguments
    from spam_hf.distributed import rank, shutdown
    from spam_hf.sharding import is_sharded

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # torch, transformers, spam-hf imported
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    kw = {}
    if a.worker.startswith("fsdp2"):
        from transformers.distributed import DistributedConfig

        kw["distributed_config"] = DistributedConfig(fsdp_size=processes)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(a.work_dir, "model"), **kw)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.steps * a.batch_size, a.seq_len), generator=g)

    class Tokens(Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i].clone()}

    args = SpamTrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size // processes,
                                 max_steps=a.steps, learning_rate=1e-4, report_to=[], save_strategy="no",
                                 disable_tqdm=True, seed=0, logging_steps=10**6, dataloader_pin_memory=False,
                                 marglik_burn_in=a.burn_in, marglik_frequency=10 * a.steps, use_cpu=True,
                                 ddp_backend="gloo" if processes > 1 else None)
    held = [0]
    if a.worker.endswith("plain"):
        plain = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        trainer = Trainer(model=model, args=TrainingArguments(**plain), train_dataset=Tokens())
    else:
        trainer = SpamTrainer(model=model, args=args, train_dataset=Tokens())
        accumulate = trainer.posterior.accumulate

        def tracked(*args, **kwargs):
            accumulate(*args, **kwargs)
            held[0] = max(held[0], sum(t.numel() * t.element_size()
                                       for d in trainer.posterior.curvature.sums.values() for t in d.values()))

        trainer.posterior.accumulate = tracked
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    local = sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in model.parameters())
    out = {"rank": rank(), "wall_s": round(wall, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
           "rss_before_model_gib": round(baseline, 3),
           "training_state_gib": round(4 * local / 2**30, 3), "curvature_peak_mib": round(held[0] / 2**20, 1)}
    if not a.worker.endswith("plain"):
        out.update(timings_s={k: round(v, 1) for k, v in trainer.timings.items()},
                   prior_updates=len(trainer.marglik_history))
    folder = os.path.join(a.work_dir, a.worker)
    with open(os.path.join(folder, f"rank{rank()}.json"), "w") as f:
        json.dump(out, f)
    if rank() == 0 and not a.worker.endswith("plain"):
        torch.save({k: v.detach() for k, v in trainer.prior.log_delta.items()}, os.path.join(folder, "priors.pt"))
    shutdown()


def run(config: str, a) -> dict:
    processes = 1 if config == "one" else a.processes
    ranks = run_workers(__file__, config, processes, os.path.join(a.work_dir, config))
    return {"processes": processes, "per_process": ranks,
            "wall_s": max(r["wall_s"] for r in ranks),
            "max_peak_rss_gib": max(r["peak_rss_gib"] for r in ranks),
            "max_training_state_gib": max(r["training_state_gib"] for r in ranks),
            "max_curvature_peak_mib": max(r["curvature_peak_mib"] for r in ranks)}


def main() -> None:
    a = parse()
    a.work_dir = os.path.abspath(a.work_dir)
    if a.worker:
        worker(a)
        return
    import torch
    from transformers import LlamaForCausalLM

    configs = chosen_configs(a.configs, CONFIGS)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(a.shape, a.layers, a.seq_len)).save_pretrained(os.path.join(a.work_dir, "model"))
    res = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "args": vars(a), "runs": {}}
    for cfg in configs:
        res["runs"][cfg] = run(cfg, a)
        print(cfg, json.dumps({k: v for k, v in res["runs"][cfg].items() if k != "per_process"}), flush=True)
    summarise(res, a.work_dir)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: {kk: v for kk, v in r.items() if "ratio" in kk or "diff" in kk or "vs" in kk}
                      for k, r in res["runs"].items()}, indent=2))


def summarise(res: dict, work_dir: str) -> None:
    """Ratios against the one-process run, in place; the priors' largest difference in ``log δ`` (the relative
    difference of ``δ``) from it and, for FSDP2, from DDP."""
    import torch

    base = res["runs"]["one"]
    priors = {cfg: torch.load(os.path.join(work_dir, cfg, "priors.pt")) for cfg in res["runs"]
              if not cfg.endswith("plain")}
    for cfg, r in res["runs"].items():
        for key in ("wall_s", "max_peak_rss_gib", "max_training_state_gib", "max_curvature_peak_mib"):
            if base[key]:
                r[key.replace("max_", "") + "_ratio"] = round(r[key] / base[key], 3)
        for ref in ("one", "ddp"):
            if cfg in priors and ref in priors and ref != cfg and not (ref == "ddp" and cfg == "one"):
                r[f"log_prior_max_diff_vs_{ref}"] = max(float((priors[cfg][k] - v).abs().max())
                                                        for k, v in priors[ref].items())
    if "fsdp2" in res["runs"] and "fsdp2-plain" in res["runs"]:  # SpaM's own cost under FSDP2
        res["runs"]["fsdp2"]["time_vs_plain_fsdp2"] = round(res["runs"]["fsdp2"]["wall_s"]
                                                            / res["runs"]["fsdp2-plain"]["wall_s"], 3)
        res["runs"]["fsdp2"]["peak_vs_plain_fsdp2"] = round(res["runs"]["fsdp2"]["max_peak_rss_gib"]
                                                            / res["runs"]["fsdp2-plain"]["max_peak_rss_gib"], 3)


if __name__ == "__main__":
    main()
