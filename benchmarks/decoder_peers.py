"""Decoder quality against the LLM pruners on one harness: perplexity after removing 30% and 50% of the blocks.

A LLaMA-layout decoder (grouped-query attention, SwiGLU MLP; default 4 blocks of width 256, MLP 768, 8 query / 4 KV
heads) is trained from random weights on WikiText-2 ``valid.txt`` with a byte-level BPE vocabulary of ``--vocab``
tokens trained on the same file, twice with the same steps and seed: with a plain ``Trainer`` and with
``SpamTrainer`` (unit priors, KFAC, likelihood tempered by ``--temperature``). Then each method prunes a copy to each
sparsity (fraction of the prunable block parameters, one global budget) with its own defaults, through
:func:`spam_hf.pruning.prune` on ``--calibration-batches`` random training batches, and perplexity is measured on
the first ``--eval-blocks`` blocks of ``test.txt``. No recovery fine-tune.

* ``spam``: spam-hf's default (``damage-obs`` in rounds with least-squares compensation) on the SpaM-trained model;
* ``damage-obs``: the same default post hoc, on the plain model (``spam-hf compress --training none``);
* ``flap``: FLAP (An et al. 2024): input fluctuation × column norm, per-layer normalised, bias compensation;
* ``wanda-sp``: structured Wanda (|W| · input RMS summed per group), one shot;
* ``magnitude`` and ``random``: one shot.

``--seeds`` are pruning seeds (calibration batches and the random baseline) over the one trained pair of
``--seed``; ``--train-per-seed`` trains a pair per seed instead (3× the training time).

``--arch mixtral`` trains a mixture of experts instead (``--experts`` experts of ``--intermediate`` neurons each,
``--experts-per-token`` per token; the defaults below give 4 experts of 384, 2 per token: the active MLP of the LLaMA
harness), whose groups are also whole experts. FLAP is left out there: its bias compensation needs an ``o_proj`` /
``down_proj`` bias, which the stock Mixtral class cannot load.

    python benchmarks/decoder_peers.py --out benchmarks/results/decoder_peers_cpu.json

The summary gives each method's perplexity and its increase over the dense model it pruned, mean and std over
seeds. ``--merge A.json B.json --out C.json`` combines invocations over disjoint seeds (one stopped early and a
rerun of the remaining seeds) into one result.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics as stats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator  # noqa: E402

from decoder_perplexity import blocks, perplexity, train_tokenizer  # noqa: E402
from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf.pruning import PruningConfig, prune  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2")
METHODS = ("spam", "damage-obs", "flap", "wanda-sp", "magnitude", "random")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=os.path.join(DATA, "valid.txt"))
    p.add_argument("--test-file", default=os.path.join(DATA, "test.txt"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (768), or each expert's (384)")
    p.add_argument("--arch", choices=("llama", "mixtral"), default="llama")
    p.add_argument("--experts", type=int, default=4, help="--arch mixtral: experts per layer")
    p.add_argument("--experts-per-token", type=int, default=2, help="--arch mixtral: experts each token is routed to")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.1, help="SpaM's likelihood temperature T")
    p.add_argument("--marglik-frequency", type=int, default=100)
    p.add_argument("--eval-blocks", type=int, default=400)
    p.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} (without flap for mixtral)")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--calibration-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the training runs")
    p.add_argument("--seeds", default="0,1,2", help="pruning seeds")
    p.add_argument("--train-per-seed", action="store_true", help="train a model pair per pruning seed")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "decoder_peers"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only combine the results of earlier invocations over disjoint seeds (e.g. one stopped after "
                        "seed 0 and a --seeds 1,2 rerun) into --out, with their commands and one summary")
    a = p.parse_args()
    if a.intermediate is None:
        a.intermediate = 384 if a.arch == "mixtral" else 768
    if a.methods is None:
        a.methods = ",".join(m for m in METHODS if not (a.arch == "mixtral" and m == "flap"))
    unknown = set(a.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if a.arch == "mixtral" and "flap" in a.methods.split(","):
        p.error("flap's bias compensation needs biases the stock Mixtral class cannot load; leave it out")
    return a


def build(a, vocab: int, seed: int):
    experts = dict(num_local_experts=a.experts, num_experts_per_tok=a.experts_per_token) if a.arch == "mixtral" else {}
    cfg = AutoConfig.for_model(a.arch, vocab_size=vocab, max_position_embeddings=a.block, hidden_size=a.hidden,
                               num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                               intermediate_size=a.intermediate, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               tie_word_embeddings=True, **experts)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def train_pair(a, train, vocab: int, seed: int, need_plain: bool, need_spam: bool) -> dict:
    """The plain and the SpaM-trained model of ``seed`` (each only when a method needs it), with their times."""
    common = dict(per_device_train_batch_size=a.batch_size, num_train_epochs=a.epochs, learning_rate=a.lr,
                  warmup_steps=50, lr_scheduler_type="cosine", seed=seed, report_to=[], save_strategy="no",
                  logging_steps=100, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
    out = {"times": {}}
    if need_plain:
        t0 = time.time()
        model = build(a, vocab, seed)
        Trainer(model=model, train_dataset=train, data_collator=default_data_collator,
                args=TrainingArguments(output_dir=os.path.join(a.work_dir, f"plain-{seed}"), weight_decay=0.01,
                                       **common)).train()
        out["plain"], out["times"]["plain_s"] = model, round(time.time() - t0, 1)
    if need_spam:
        t0 = time.time()
        model = build(a, vocab, seed)
        trainer = SpamTrainer(model=model, train_dataset=train, data_collator=default_data_collator,
                              args=SpamTrainingArguments(output_dir=os.path.join(a.work_dir, f"spam-{seed}"), **common,
                                                         marglik_frequency=a.marglik_frequency,
                                                         marglik_burn_in=a.marglik_frequency,
                                                         temperature=a.temperature))
        trainer.train()
        out["spam"], out["posterior"], out["times"]["spam_s"] = model, trainer.posterior, round(time.time() - t0, 1)
    return out


def prune_copy(pair: dict, method: str, sparsity: float, train, a, seed: int):
    """A pruned copy of the model ``method`` works on, with the method's defaults."""
    spam = method == "spam"
    model = copy.deepcopy(pair["spam" if spam else "plain"])
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=a.calibration_batch_size, shuffle=True, generator=g,
                        collate_fn=default_data_collator)
    config = PruningConfig(sparsity=sparsity, method="auto" if spam else method, flops_seq_len=a.block,
                           calibration_batches=a.calibration_batches, prune_seed=seed)
    result = prune(model, pair["posterior"] if spam else None, config, calibration=loader)
    return model, result


def main() -> None:
    a = parse()
    if a.merge:
        return merge(a.merge, a.out)
    os.makedirs(a.work_dir, exist_ok=True)
    torch.manual_seed(a.seed)
    tok = train_tokenizer(a.train_file, a.vocab)
    train = blocks(a.train_file, tok, a.block)
    test = blocks(a.test_file, tok, a.block, a.eval_blocks)
    methods = a.methods.split(",")
    sparsities = [float(s) for s in a.sparsities.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {torch.get_num_threads()} threads",
              "command": "python " + " ".join(sys.argv), "args": vars(a), "train_blocks": len(train),
              "eval_tokens": len(test) * (a.block - 1), "trained": {}, "runs": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)

    need_plain, need_spam = any(m != "spam" for m in methods), "spam" in methods
    pair = None
    for seed in seeds:
        if pair is None or a.train_per_seed:
            train_seed = seed if a.train_per_seed else a.seed
            pair = train_pair(a, train, len(tok), train_seed, need_plain, need_spam)
            dense = {k: perplexity(pair[k], test) for k in ("plain", "spam") if k in pair}
            result["trained"][str(train_seed)] = {"dense_perplexity": dense, **pair["times"]}
            print(f"trained (seed {train_seed}): dense perplexity {dense}, {pair['times']}", flush=True)
            save()
        for method in methods:
            for s in sparsities:
                t0 = time.time()
                model, res = prune_copy(pair, method, s, train, a, seed)
                kept: dict = {}  # groups left in all layers, per kind (experts show whether whole ones went)
                for layer in res.selection.layers:
                    for field, n in layer.kept.items():
                        kept[field] = kept.get(field, 0) + n
                run = {"method": method, "sparsity": s, "seed": seed, "achieved": res.selection.achieved,
                       "perplexity": perplexity(model, test), "prune_s": round(time.time() - t0, 1), "kept": kept,
                       "config": {k: v for k, v in res.config.to_dict().items()
                                  if k in ("method", "rounds", "compensate", "compensation")}}
                result["runs"].append(run)
                save()
                print(f"seed {seed} {method:>10} {s:.0%}: perplexity {run['perplexity']:.2f}", flush=True)
    result["summary"] = summarise(result)
    save()
    print(json.dumps(result["summary"], indent=2))


def merge(paths: list, out: str) -> None:
    """Combine invocations over disjoint seeds (the same settings) into ``out``: their runs, trained pairs and
    commands, and the summary of all of them."""
    parts = [json.load(open(p)) for p in paths]
    seeds = [{r["seed"] for r in p["runs"]} for p in parts]
    if sum(len(s) for s in seeds) != len(set().union(*seeds)):
        raise SystemExit(f"the invocations share seeds: {seeds}")
    result = {**parts[0], "command": [p["command"] for p in parts], "date": max(p["date"] for p in parts),
              "trained": {k: v for p in parts for k, v in p["trained"].items()},
              "runs": [r for p in parts for r in p["runs"]]}
    result.pop("stopped", None)
    result["summary"] = summarise(result)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["summary"], indent=2))


def summarise(result: dict) -> dict:
    """``{method: {sparsity: {"mean", "std", "n", "increase_pct", "increase_std"}}}`` over seeds: the perplexity,
    and its increase over the dense model that method pruned (the SpaM-trained one for ``spam``, the plain one
    otherwise) in percent, which takes out the spread between trained models."""
    per_seed = result["args"].get("train_per_seed")
    out: dict = {}
    for r in result["runs"]:
        key = str(r["seed"] if per_seed else result["args"]["seed"])
        dense = result["trained"][key]["dense_perplexity"]["spam" if r["method"] == "spam" else "plain"]
        cell = out.setdefault(r["method"], {}).setdefault(f"{r['sparsity']:g}", {"ppl": [], "inc": []})
        cell["ppl"].append(r["perplexity"])
        cell["inc"].append(100.0 * (r["perplexity"] / dense - 1.0))

    def sd(v):
        return round(stats.stdev(v), 2) if len(v) > 1 else 0.0

    return {m: {s: {"mean": round(stats.mean(c["ppl"]), 2), "std": sd(c["ppl"]), "n": len(c["ppl"]),
                    "increase_pct": round(stats.mean(c["inc"]), 2), "increase_std": sd(c["inc"])}
                for s, c in d.items()} for m, d in out.items()}


if __name__ == "__main__":
    main()
