"""SpamTrainer against a plain Trainer: wall time and peak memory for the same model, data, steps and seed.

Each configuration runs in its own subprocess (clean peak RSS, or peak CUDA memory on a GPU):
``plain`` (transformers.Trainer, weight decay 0.01), ``kfac`` and ``diag`` (SpamTrainer, unit prior).
A short run cannot reach the default schedule (a prior update every 200 steps), so updates are
taken every ``--marglik-frequency`` steps and the report also projects the overhead at the
defaults from the measured components (hooks, eigendecompositions, hyper-steps).

    python benchmarks/training_overhead.py --train-file ../shared/data/sst2/train.tsv \
        --out benchmarks/results/training_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from workers import report, run_workers, write_and_show_ratios  # noqa: E402  (benchmarks/ is the script's folder)


def worker(a) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from sst2_accuracy import load_model, read_sst2
    from spam_hf import SpamTrainer, SpamTrainingArguments

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model_path)
    train = read_sst2(a.train_file, tok, a.max_seq_length, a.steps * a.batch_size, seed=0)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                  learning_rate=1e-4, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                  logging_steps=10**6)
    torch.manual_seed(0)
    model = load_model(a.model_path)
    if a.worker == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(weight_decay=0.01, **common), train_dataset=train,
                          data_collator=DataCollatorWithPadding(tok))
    else:
        args = SpamTrainingArguments(curvature=a.worker, marglik_frequency=a.marglik_frequency,
                                     marglik_burn_in=a.marglik_frequency, **common)
        trainer = SpamTrainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    out = {"config": a.worker, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if a.worker != "plain":
        out["timings"] = trainer.timings
        out["prior_updates"] = len(trainer.marglik_history)
        out["curvature_every"] = trainer.args.curvature_every
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="minilm")
    p.add_argument("--train-file", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--marglik-frequency", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="plain,kfac,diag")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from sst2_accuracy import model_path

    a.model_path = model_path(a.model_path)
    if a.worker:
        report(worker(a))
        return
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "args": vars(a), "runs": {}}
    res["runs"] = run_workers(__file__, a.configs.split(","), sys.argv[1:])
    plain = res["runs"].get("plain")
    if plain:
        for cfg, r in res["runs"].items():
            if cfg == "plain":
                continue
            r["time_ratio"] = r["wall_s"] / plain["wall_s"]
            r["peak_rss_ratio"] = r["peak_rss_mb"] / plain["peak_rss_mb"]
            t = r["timings"]
            # the worker keeps the default n_hypersteps, so one update here costs what it costs at the defaults;
            # only their frequency differs (every --marglik-frequency steps here, every 200 by default)
            per_update = (t["eigh_s"] + t["hypersteps_s"]) / max(r["prior_updates"], 1)
            hooks_and_prior = r["wall_s"] - plain["wall_s"] - t["eigh_s"] - t["hypersteps_s"]
            projected = plain["wall_s"] + hooks_and_prior + per_update * a.steps / 200
            r["projected_time_ratio_at_defaults"] = projected / plain["wall_s"]
    write_and_show_ratios(res, a.out)


if __name__ == "__main__":
    main()
