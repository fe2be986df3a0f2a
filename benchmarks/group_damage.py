"""Accuracy at high sparsity without recovery: group damage, compensation and rounds, added one at a time.

For each finished ``spam-hf compress`` run (``--run-dirs``, one per seed: its ``dense/`` model and SpaM
posterior), prune copies of the dense model at each sparsity with:

* ``opd``: SpaM + OPD as ``spam-hf prune`` does today (diagonal posterior precision, one shot);
* ``damage`` / ``damage-out``: KFAC group damage of all slices / of the consuming slices, one shot;
* ``damage-obs``: the consuming slices' KFAC damage left after the least-squares compensation (the Schur
  complement of the input factor in place of its diagonal block; meant with ``+comp``);
* ``damage-exact``: the consuming slices' damage with the exact within-group Fisher (sampled labels,
  the run's priors and temperature) instead of the Kronecker approximation;
* ``<score>+comp``: with compensation of O / down (``--compensation``: least squares, the default, or the
  KFAC posterior's conditional mean);
* ``<score>+comp+rounds``: in ``--rounds`` rounds (geometric targets), statistics re-collected each round;
  ``+auto-rounds``: as many rounds as :func:`~spam_hf.pruning.rounds_for_sparsity` gives (none removing
  more than 30% of what is left: 2 / 4 / 7 at 50 / 70 / 90%);
* ``mask-fisher`` (peer, Kwon et al. 2022 without mask tuning): ``Σ_b (Σ_{t, c∈g} x ∂ℓ/∂x)²`` at the
  inputs of O / down, the empirical Fisher of a mask on each head / neuron; also ``+comp+rounds``;
* ``magnitude``.

With ``--recovery-methods``, those methods are also measured after ``--recovery-steps`` of plain
fine-tuning and, with ``--distill α``, after the same steps of distillation from the dense model.

Calibration statistics (KFAC factors with tokens as rows, mask Fisher) come from ``--calib-batches``
batches of the run's own training file (never the dev file). A damage-fidelity table
(``--fidelity``) compares each score's ranking of every head and a sample of neurons with the actual
loss increase when that group alone is removed, on held-back training batches (Spearman).
Results are written after every measurement.

    python benchmarks/group_damage.py --run-dirs runs/cpu-s0,runs/cpu-s1,runs/cpu-s2 \\
        --dev-file ../shared/data/sst2/dev.tsv --out benchmarks/results/group_damage_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from sst2_accuracy import accuracy, read_sst2  # noqa: E402
from spam_hf import SpamLaplace, apply, from_pretrained, plan  # noqa: E402
from spam_hf.architectures import group_specs  # noqa: E402
from spam_hf.data import packaged_sst2_files  # noqa: E402
from spam_hf.distill import DistillationTrainer, frozen_copy  # noqa: E402
from spam_hf.pruning import geometric_targets, get_score, prune_in_rounds, rounds_for_sparsity, score_names  # noqa: E402
from spam_hf.pruning.compensation import COMPENSATIONS  # noqa: E402

METHODS = ("opd", "magnitude", "damage", "damage-out", "damage-exact", "damage-exact+comp", "damage-exact+comp+rounds",
           "damage-exact+comp+auto-rounds", "damage+comp+rounds", "damage-obs+comp+auto-rounds", "mask-fisher",
           "mask-fisher+comp+rounds")


def mask_fisher(model, loader, max_batches):
    """Peer score: the empirical Fisher of a multiplicative mask on each head / neuron (Kwon et al. 2022),
    ``Σ_b (Σ_{t, c ∈ g} x_btc ∂ℓ_b/∂x_btc)²`` at the inputs x of the consuming modules (O, down)."""
    specs = group_specs(model)
    consumers = {m: s for s in specs for m in s.col_index}
    grads, inputs, handles = {}, {}, []

    def pre_hook(name):
        def hook(mod, args):
            x = args[0]
            inputs[name] = x.detach()
            x.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    for m in consumers:
        handles.append(model.get_submodule(m).register_forward_pre_hook(pre_hook(m)))
    scores = {s.name: torch.zeros(s.count, dtype=torch.float64) for s in specs}
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            model.zero_grad()
            out = model(**batch)
            torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="sum").backward()
            for m, s in consumers.items():
                xg = (inputs[m] * grads[m]).sum(1)  # [B, in]: summed over tokens
                per_group = xg[:, s.col_index[m]].sum(-1)  # [B, G]
                scores[s.name] += per_group.double().square().sum(0)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad()
    return scores


def loader_of(rows, collator, batch_size, seed):
    return DataLoader(rows, batch_size=batch_size, shuffle=True, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


class Run:
    """One seed: the dense model, its saved posterior, calibration and held-back data."""

    def __init__(self, run_dir, a):
        self.dir = run_dir
        dense = os.path.join(run_dir, "dense")
        cfg = json.load(open(os.path.join(run_dir, "run_config.json")))
        self.tok = AutoTokenizer.from_pretrained(dense)
        self.col = DataCollatorWithPadding(self.tok)
        self.model = from_pretrained(dense).eval()
        state = json.load(open(os.path.join(dense, "spam_state.json")))
        self.n_data = state["n_data"]
        self.posterior = SpamLaplace(self.model, n_data=self.n_data, temperature=state.get("temperature", 1.0))
        self.posterior.load(dense)
        train_file = cfg["data"]["train_file"] or packaged_sst2_files()[0]  # the demo: the packaged sample
        if not os.path.isabs(train_file):
            train_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", train_file)
        rows = read_sst2(train_file, self.tok, a.max_seq_length)
        order = list(range(len(rows)))
        random.Random(a.seed).shuffle(order)
        n_cal = a.calib_batches * a.batch_size
        self.calib = [rows[i] for i in order[:n_cal]]
        self.heldout = [rows[i] for i in order[n_cal:n_cal + a.heldout_rows]]
        self.train = rows
        self.seed = cfg["training"]["seed"]

    def calib_loader(self, a):
        return loader_of(self.calib, self.col, a.batch_size, a.seed)

    def make_posterior(self, model, mask_fisher: bool = True):
        """Calibration posterior of a (pruned) model: token-level KFAC ("expand"), this run's N, and the mask
        Fisher when the method reads it (``damage-exact``)."""
        return SpamLaplace(model, reduction="expand", n_data=self.n_data, temperature=self.posterior.temperature,
                           mask_fisher=mask_fisher)


def prune_one(run, method, sparsity, a):
    """A pruned copy of ``run.model``, the fraction of its prunable parameters removed, the per-layer report."""
    model = copy.deepcopy(run.model)
    base, *extra = method.split("+")
    if base in ("opd", "magnitude"):  # as `spam-hf prune` does: the saved posterior, one shot
        p = plan(model, run.posterior if base == "opd" else None, sparsity, method=base)
        return apply(model, p), p.achieved, [r.to_dict() for r in p.selection.layers]
    scores_fn = (lambda m, la: mask_fisher(m, run.calib_loader(a), a.calib_batches)) if base == "mask-fisher" else None
    rounds = a.rounds if "rounds" in extra else rounds_for_sparsity(sparsity) if "auto-rounds" in extra else 1
    targets = geometric_targets(sparsity, rounds)
    make = functools.partial(run.make_posterior,
                             mask_fisher=base in score_names() and "mask_fisher" in get_score(base).needs)
    res = prune_in_rounds(model, make, run.calib_loader(a), targets, method=base,
                          compensate="comp" in extra, max_batches=a.calib_batches, scores_fn=scores_fn,
                          start_from=run.posterior, compensation=a.compensation)
    return model, res.achieved, [r.to_dict() for r in res.selection.layers]


def recover(model, run, a, distill=0.0):
    """``--recovery-steps`` of plain fine-tuning, or of distillation from the dense model (weight ``distill``)."""
    args = TrainingArguments(output_dir=os.path.join(a.work_dir, "recovery"), per_device_train_batch_size=32,
                             learning_rate=a.recovery_lr, max_steps=a.recovery_steps, save_strategy="no",
                             report_to=[], seed=run.seed, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    if distill:
        DistillationTrainer(model=model, args=args, train_dataset=run.train, data_collator=run.col,
                            teacher=frozen_copy(run.model), alpha=distill, temperature=a.distill_temperature).train()
    else:
        Trainer(model=model, args=args, train_dataset=run.train, data_collator=run.col).train()
    return model


def spearman(x, y):
    rx, ry = torch.tensor(x).argsort().argsort().double(), torch.tensor(y).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def fidelity(run, a):
    """Spearman correlation of each score with the actual held-back loss increase of removing one group."""
    from spam_hf.pruning import group_scores, mask_groups

    model = run.model
    held = loader_of(run.heldout, run.col, 64, 0)

    def loss(m):
        with torch.no_grad():
            return sum(float(m(**b).loss) * len(b["labels"]) for b in held) / len(run.heldout)

    base_loss = loss(model)
    specs = group_specs(model)
    la = run.make_posterior(model)
    la.carry_over(run.posterior, {})
    la.collect(run.calib_loader(a), max_batches=a.calib_batches, progress=False)
    scores = {"opd": group_scores(model, specs, "opd", prior=run.posterior.prior, curvature=run.posterior.diagonal()),
              "damage": group_scores(model, specs, "damage", prior=la.prior, factors=la.factors()),
              "damage-out": group_scores(model, specs, "damage-out", prior=la.prior, factors=la.factors()),
              "damage-obs": group_scores(model, specs, "damage-obs", prior=la.prior, factors=la.factors()),
              "damage-exact": group_scores(model, specs, "damage-exact", prior=la.prior, mask_fisher=la.group_fisher()),
              "mask-fisher": mask_fisher(model, run.calib_loader(a), a.calib_batches),
              "magnitude": group_scores(model, specs, "magnitude")}
    rng = random.Random(0)
    groups = [(s, g) for s in specs if s.kind == "head" for g in range(s.count)]
    neurons = [(s, g) for s in specs if s.kind == "neuron" for g in range(s.count)]
    groups += rng.sample(neurons, min(a.fidelity_neurons, len(neurons)))
    actual = []
    for s, g in groups:
        m = copy.deepcopy(model)
        keep = {s.name: torch.tensor([i for i in range(s.count) if i != g])}
        mask_groups(m, specs, keep)
        actual.append(loss(m) - base_loss)
    out = {"groups": len(groups), "heads": sum(s.kind == "head" for s, _ in groups),
           "actual_negative": sum(x < 0 for x in actual) / len(actual),  # removals that lowered the held-back loss
           "actual_median_abs": sorted(abs(x) for x in actual)[len(actual) // 2], "base_loss": base_loss}
    for name, sc in scores.items():
        out[name] = spearman([float(sc[s.name][g]) for s, g in groups], actual)
        out[name + "/heads"] = spearman([float(sc[s.name][g]) for s, g in groups if s.kind == "head"],
                                        [x for (s, _), x in zip(groups, actual) if s.kind == "head"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dirs", required=True, help="comma-separated spam-hf compress output dirs (one per seed)")
    p.add_argument("--dev-file", required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--recovery-methods", default="", help="methods also measured after --recovery-steps")
    p.add_argument("--recovery-steps", type=int, default=200)
    p.add_argument("--recovery-lr", type=float, default=5e-5)
    p.add_argument("--distill", type=float, default=0.0, help="also recover by distillation from the dense model "
                                                              "with this weight of the soft labels (0 = not)")
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--compensation", default="least-squares", choices=COMPENSATIONS,
                   help="how '+comp' methods compensate (spam_hf.pruning.compensation)")
    p.add_argument("--damping-scale", type=float, default=1.0,
                   help="with --compensation posterior: multiply the prior damping T·δ/g_i by this (a sensitivity study)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--heldout-rows", type=int, default=256)
    p.add_argument("--fidelity", action="store_true")
    p.add_argument("--fidelity-neurons", type=int, default=100)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="calibration sample and order")
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work"))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_grad_enabled(True)
    if a.damping_scale != 1.0:
        import spam_hf.pruning.compensation as comp

        shipped = comp.prior_times_temperature
        comp.prior_times_temperature = lambda *args, **kw: a.damping_scale * shipped(*args, **kw)
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "machine": "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else
           f"CPU, {torch.get_num_threads()} threads", "args": vars(a), "runs": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)

    recovery_methods = set(filter(None, a.recovery_methods.split(",")))
    for run_dir in a.run_dirs.split(","):
        run = Run(run_dir, a)
        dev = read_sst2(a.dev_file, run.tok, a.max_seq_length)
        with torch.no_grad():
            dense = accuracy(run.model, dev, run.col)
        entry = {"run_dir": run_dir, "seed": run.seed, "dense": dense, "rows": []}
        res["runs"].append(entry)
        print(f"{run_dir}: dense {dense:.4f}", flush=True)
        if a.fidelity:
            entry["fidelity"] = fidelity(run, a)
            print("fidelity", entry["fidelity"], flush=True)
            save()
        for method in filter(None, a.methods.split(",")):  # --methods "" with --fidelity: the fidelity table only
            for s in map(float, a.sparsities.split(",")):
                t0 = time.time()
                model, achieved, layers = prune_one(run, method, s, a)
                with torch.no_grad():
                    row = {"method": method, "sparsity": s, "achieved": achieved, "accuracy": accuracy(model, dev, run.col),
                           "prune_s": time.time() - t0, "layers": layers}
                if method in recovery_methods:
                    pruned = copy.deepcopy(model) if a.distill else None
                    row["accuracy_recovered"] = accuracy(recover(model, run, a), dev, run.col)
                    if a.distill:
                        row["accuracy_distilled"] = accuracy(recover(pruned, run, a, a.distill), dev, run.col)
                entry["rows"].append(row)
                save()
                print(f"{method:>24} {s:.0%}: {row['accuracy']:.4f}"
                      + (f" -> {row['accuracy_recovered']:.4f}" if "accuracy_recovered" in row else "")
                      + (f" (distilled {row['accuracy_distilled']:.4f})" if "accuracy_distilled" in row else ""), flush=True)


if __name__ == "__main__":
    main()
