"""Cost of SpaM's curvature and marginal-likelihood work against a plain training step, on the CPU.

MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, FFN 1536; random weights), batch 32 × 64 tokens,
sequence classification, 36 prunable Linear layers. Measures (median of repeats, same batches):

* plain forward + backward;
* the same step with curvature hooks + the extra backward of the sampled loss, per curvature kind and
  reduction, with all rows and with the default row cap;
* float64 eigendecomposition of every KFAC factor, and one hyper-step (log marglik + its gradient);
* the amortised overhead at the default schedule: curvature every ``curvature_every`` steps,
  ``n_hypersteps`` hyper-steps and one eigendecomposition every ``marglik_frequency`` steps;
* how far factors from a row subsample are from factors of all rows (relative Frobenius error).

    python benchmarks/curvature_cost.py --out benchmarks/results/curvature_cost_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from spam_hf.architectures import group_specs, prunable_modules  # noqa: E402
from spam_hf.training_arguments import SpamTrainingArguments  # noqa: E402
from spam_hf.curvature import CurvatureAccumulator  # noqa: E402
from spam_hf.posterior import SpamLaplace  # noqa: E402


def batches(n: int, bs: int, T: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(T // 3, T + 1, (bs,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1000, vocab, (bs, T), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (bs,), generator=g)})
    return out


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "curvature_cost_cpu.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                     intermediate_size=a.intermediate, num_labels=2)
    model = BertForSequenceClassification(cfg).train()
    specs = group_specs(model)
    names = prunable_modules(specs)
    data = batches(4, a.batch_size, a.seq_len, cfg.vocab_size)
    defaults = SpamTrainingArguments(output_dir="/tmp/unused", report_to=[])
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine":
           f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "config": vars(a),
           "n_modules": len(names), "defaults": {"curvature_every": defaults.curvature_every,
                                                  "curvature_max_rows": defaults.curvature_max_rows,
                                                  "marglik_frequency": defaults.marglik_frequency,
                                                  "n_hypersteps": defaults.n_hypersteps}, "step_s": {}}

    def plain():
        model.zero_grad()
        model(**data[0]).loss.backward()

    res["step_s"]["plain"] = median_time(plain, a.repeats)
    accs = {}
    for kind in ("kfac", "diag"):
        for reduction in ("reduce", "reduce-gw", "expand"):
            for cap in (0, defaults.curvature_max_rows):
                if reduction != "expand" and cap:
                    continue  # a sequence-level reduction has one row per sequence: nothing to cap
                acc = SpamLaplace(model, prior="unit", curvature=kind, reduction=reduction,
                                  max_rows_per_batch=cap or None, n_data=67349)

                def step(acc=acc):
                    model.zero_grad()
                    with acc.capture(model, data[0]["attention_mask"]):
                        out = model(**data[0])
                    acc.accumulate(out.logits, data[0]["labels"])
                    out.loss.backward()

                key = f"{kind}/{reduction}" + (f"/cap{cap}" if cap else "")
                res["step_s"][key] = median_time(step, a.repeats)
                accs[key] = acc
                print(f"{key:28s} {res['step_s'][key]:.3f} s  ({res['step_s'][key] / res['step_s']['plain']:.2f}x plain)",
                      flush=True)
    la = accs["kfac/reduce"]
    t0 = time.perf_counter()
    kron = la.curvature_estimate()
    res["eigh_all_factors_s"] = time.perf_counter() - t0

    def hyper():
        for v in la.prior.parameters():
            v.grad = None
        (-la.log_marginal_likelihood(kron)).backward()

    res["hyperstep_s"] = median_time(hyper, a.repeats)
    d = res["defaults"]
    for key in ("kfac/reduce", "diag/reduce", "kfac/expand/cap1024"):
        extra = res["step_s"][key] - res["step_s"]["plain"]
        per_update = (res["eigh_all_factors_s"] if key.startswith("kfac") else 0.0) + d["n_hypersteps"] * res["hyperstep_s"]
        amortised = extra / d["curvature_every"] + per_update / d["marglik_frequency"]
        res.setdefault("amortised_overhead", {})[key] = amortised / res["step_s"]["plain"]
    # subsampled vs full factors (expand: tokens as rows), same 4 batches
    errors = {}
    full = CurvatureAccumulator(model, names, kind="kfac", reduction="expand", fisher="empirical")
    subs = {c: CurvatureAccumulator(model, names, kind="kfac", reduction="expand", fisher="empirical",
                                    max_rows_per_batch=c, seed=1) for c in (256, 512, 1024)}
    for b in data:
        for acc in [full, *subs.values()]:
            with acc.capture(model, b["attention_mask"]):
                out = model(**b)
            acc.accumulate(out.logits, b["labels"])
    for c, acc in subs.items():
        ea, eg = [], []
        for m in names:
            A_full, A_sub = full.sums[m]["A"] / full.n, acc.sums[m]["A"] / acc.n
            G_full, G_sub = full.sums[m]["G"] / full.n, acc.sums[m]["G"] / acc.n
            ea.append(float((A_sub - A_full).norm() / A_full.norm()))
            eg.append(float((G_sub - G_full).norm() / G_full.norm()))
        errors[str(c)] = {"rows_per_batch": c, "rows_full_per_batch": float(full.n) / len(data),
                          "A_rel_err_mean": statistics.mean(ea), "A_rel_err_max": max(ea),
                          "G_rel_err_mean": statistics.mean(eg), "G_rel_err_max": max(eg)}
    res["subsample_error"] = errors
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: res[k] for k in ("eigh_all_factors_s", "hyperstep_s", "amortised_overhead",
                                         "subsample_error")}, indent=2))


if __name__ == "__main__":
    main()
