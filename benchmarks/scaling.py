"""How SpaM's overhead and memory grow with model depth and width (BERT-shaped, random weights, CPU).

For each (layers, hidden) in the grid (FFN = 4·hidden, head width 64), in a fresh subprocess (so that
peak memory is this configuration's alone), with batch ``--batch-size`` × ``--seq-len`` tokens:

* ``plain_s``: forward + backward (median of repeats);
* ``kfac_step_s`` / ``diag_step_s``: the same step with curvature hooks + the sampled-loss backward;
* ``eigh_s``: float64 eigendecomposition of every KFAC factor; ``hyperstep_s``: one log-marglik
  gradient step with unit priors;
* ``amortised_overhead``: ``(step − plain)/curvature_every + (eigh + n_hypersteps·hyperstep)/marglik_frequency``
  over ``plain`` at the defaults (4, 20, 200);
* memory: curvature state bytes from the formula and as allocated, and the process's peak-RSS
  growth while accumulating and eigendecomposing (``ru_maxrss`` after minus before).

Memory formula (per prunable Linear ``out × in`` with bias; sums in the model's float32): KFAC stores
``A`` ``(in+1)²`` and ``G`` ``out²`` → ``4·Σ[(in+1)² + out²]`` bytes; the diagonal stores ``out·(in+1)``
→ ``4·Σ out·(in+1)``. For a BERT layer of width ``h`` (Q, K, V, O: ``h×h``; up ``4h×h``; down ``h×4h``)
that is ``≈ 4·42h²`` (KFAC) vs ``4·12h²`` (diag) bytes per layer, against ``4·12h²`` bytes of float32
weights: 3.5× vs 1× the layer's weights. A prior update adds the squared eigenvectors (float32, the
size of the KFAC state again) plus float64 temporaries of one factor at a time; after it, only the
factors' diagonals are kept for pruning.

    python benchmarks/scaling.py --out benchmarks/results/scaling_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

GRID = "4x256,8x256,12x256,24x256,4x512,4x768,4x1024"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=GRID, help="comma-separated LAYERSxHIDDEN")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # LAYERSxHIDDENxKIND: run one measurement
    return p.parse_args()


def formula_bytes(model, names, kind: str, itemsize: int = 4) -> int:
    from spam_hf.architectures.base import lookup_linear

    mods = dict(model.named_modules())
    total = 0
    for n in names:
        fan_in, fan_out, bias = lookup_linear(mods, n, "scaling")
        total += ((fan_in + bias) ** 2 + fan_out**2) if kind == "kfac" else fan_out * (fan_in + bias)
    return itemsize * total


def measure_one(layers: int, hidden: int, kind: str, a) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from spam_hf.architectures import group_specs, prunable_modules
    from spam_hf.posterior import SpamLaplace

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=4 * hidden, num_labels=2)
    model = BertForSequenceClassification(cfg).train()
    specs = group_specs(model)
    names = prunable_modules(specs)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, cfg.vocab_size, (a.batch_size, a.seq_len), generator=g),
             "attention_mask": torch.ones(a.batch_size, a.seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (a.batch_size,), generator=g)}

    def timed(fn):
        fn()
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def plain():
        model.zero_grad()
        model(**batch).loss.backward()

    out = {"layers": layers, "hidden": hidden, "kind": kind,
           "params": sum(p.numel() for p in model.parameters()),
           "block_params": sum(p.numel() for n in names for p in model.get_submodule(n).parameters())}
    out["plain_s"] = timed(plain)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    la = SpamLaplace(model, prior="unit", curvature=kind, reduction="reduce", n_data=67349)
    acc = la.curvature

    def step():
        model.zero_grad()
        with acc.capture(model, batch["attention_mask"]):
            o = model(**batch)
        acc.accumulate(o.logits, batch["labels"])
        o.loss.backward()

    out["step_s"] = timed(step)
    out["state_bytes_formula"] = formula_bytes(model, names, kind, torch.empty((), dtype=acc.dtype).element_size())
    # the factors (each module's row count, one float64, is not in the formula)
    out["state_bytes_allocated"] = sum(v.numel() * v.element_size() for d in acc.sums.values() for k, v in d.items()
                                       if k != "R")
    t0 = time.perf_counter()
    curv = la.curvature_estimate()
    out["eigh_s"] = time.perf_counter() - t0 if kind == "kfac" else 0.0
    def hyper():
        for v in la.prior.parameters():
            v.grad = None
        (-la.log_marginal_likelihood(curv)).backward()

    out["hyperstep_s"] = timed(hyper)
    out["peak_rss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    out["weights_fp32_bytes"] = 4 * out["block_params"]
    every, hypersteps, freq = 4, 20, 200
    out["amortised_overhead"] = ((out["step_s"] - out["plain_s"]) / every
                                 + (out["eigh_s"] + hypersteps * out["hyperstep_s"]) / freq) / out["plain_s"]
    return out


def main() -> None:
    a = parse()
    if a.one:
        layers, hidden, kind = a.one.split("x")
        print("RESULT " + json.dumps(measure_one(int(layers), int(hidden), kind, a)), flush=True)
        return
    import torch

    res = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "machine": f"CPU, {torch.get_num_threads()} threads", "args": vars(a), "runs": []}
    for cell in a.grid.split(","):
        for kind in ("kfac", "diag"):
            cmd = [sys.executable, __file__, "--one", f"{cell}x{kind}", "--batch-size", str(a.batch_size),
                   "--seq-len", str(a.seq_len), "--repeats", str(a.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{cell} {kind} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(line[len("RESULT "):])
            res["runs"].append(r)
            print(f"{cell:>8} {kind}: step {r['step_s'] / r['plain_s']:.2f}x plain, amortised +"
                  f"{r['amortised_overhead']:.1%}, eigh {r['eigh_s']:.2f} s, state {r['state_bytes_formula'] / 2**20:.1f} MiB "
                  f"(allocated {r['state_bytes_allocated'] / 2**20:.1f}), peak RSS +{r['peak_rss_growth_bytes'] / 2**20:.0f} MiB",
                  flush=True)
            if a.out:
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=2)
    if a.out:
        plot(res, os.path.splitext(a.out)[0] + ".png")


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, marker in (("kfac", "o"), ("diag", "s")):
        runs = sorted((r for r in res["runs"] if r["kind"] == kind), key=lambda r: r["block_params"])
        x = [r["block_params"] / 1e6 for r in runs]
        axes[0].plot(x, [100 * r["amortised_overhead"] for r in runs], marker=marker, label=kind)
        axes[1].plot(x, [r["state_bytes_allocated"] / r["weights_fp32_bytes"] for r in runs], marker=marker,
                     label=f"{kind}: state / fp32 weights")
        axes[1].plot(x, [r["peak_rss_growth_bytes"] / r["weights_fp32_bytes"] for r in runs], marker=marker,
                     linestyle="--", label=f"{kind}: peak RSS growth / fp32 weights")
    axes[0].set_xlabel("prunable block parameters (M)")
    axes[0].set_ylabel("amortised overhead (% of a plain step)")
    axes[0].set_xscale("log")
    axes[1].set_xlabel("prunable block parameters (M)")
    axes[1].set_ylabel("× fp32 block weights")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
