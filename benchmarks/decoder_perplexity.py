"""Decoder pruning: perplexity before/after removing heads and neurons, SpaM + OPD vs baselines.

A small LLaMA-shaped (GQA) and a GPT-2-shaped model are trained from random weights on WikiText-2
``valid.txt`` (byte-level BPE tokenizer trained on the same file) twice, with the same steps and seed:
with SpamTrainer (unit priors, KFAC with token-level "expand" curvature) and with a plain Trainer.
``spam-opd`` prunes the SpaM model; ``posthoc-opd`` (priors fitted post hoc on one pass), ``fisher``,
``magnitude`` and ``random`` prune the plain model, as in ``sst2_accuracy.py``. Each method prunes
a copy to each sparsity (fraction of prunable block parameters, global) and perplexity is measured
on the first ``--eval-blocks`` blocks of ``test.txt``. No recovery fine-tune. Results go to a JSON
file (rewritten after every measurement) and a PNG plot.

LLaMA (GQA) is pruned at two granularities from the same scores: query heads and KV heads as
separate groups (the default; method names as above) and whole KV groups (``<method>/kv-groups``,
``kv_groups_only=True``). The SpaM model's priors are learned on the default groups either way.
``--temperature T`` tempers SpaM's likelihood (``T < 1`` weakens the priors' pull); with
``--methods spam-opd`` no plain model is trained.

    python benchmarks/decoder_perplexity.py --out benchmarks/results/decoder_perplexity_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer,  # noqa: E402
                          TrainingArguments, default_data_collator)

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf.architectures import group_specs  # noqa: E402
from spam_hf.costs import model_costs  # noqa: E402
from spam_hf import apply, plan  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=os.path.join(DATA, "valid.txt"))
    p.add_argument("--test-file", default=os.path.join(DATA, "test.txt"))
    p.add_argument("--archs", default="llama,gpt2")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="LLaMA key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-train-blocks", type=int, default=None)
    p.add_argument("--eval-blocks", type=int, default=400)
    p.add_argument("--methods", default="spam-opd,posthoc-opd,fisher,magnitude,random")
    p.add_argument("--posthoc-batches", type=int, default=100)
    p.add_argument("--sparsities", default="0.3,0.5,0.7")
    p.add_argument("--marglik-frequency", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="SpaM's likelihood temperature T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "decoder"))
    return p.parse_args()


def train_tokenizer(path: str, vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``path`` (offline; the Hub's GPT-2 tokenizer is not needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([path], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def blocks(path: str, tok, block: int, limit=None):
    with open(path) as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    out = [{"input_ids": ids[i * block:(i + 1) * block], "attention_mask": [1] * block,
            "labels": ids[i * block:(i + 1) * block]} for i in range(n)]
    return out[:limit] if limit else out


def build(arch: str, a, vocab: int):
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=vocab, n_positions=a.block, n_embd=a.hidden, n_layer=a.layers,
                                   n_head=a.heads, n_inner=a.intermediate, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    else:
        cfg = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=a.block, hidden_size=a.hidden,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(a.seed)
    return AutoModelForCausalLM.from_config(cfg)


@torch.no_grad()
def perplexity(model, data, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = default_data_collator(data[i:i + batch_size])
        out = model(**batch)
        n = batch["labels"][:, 1:].numel()
        total += float(out.loss) * n
        count += n
    return math.exp(total / count)


def main() -> None:
    a = parse()
    os.makedirs(a.work_dir, exist_ok=True)
    torch.manual_seed(a.seed)
    tok = train_tokenizer(a.train_file, a.vocab)
    train = blocks(a.train_file, tok, a.block, a.max_train_blocks)
    test = blocks(a.test_file, tok, a.block, a.eval_blocks)
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {torch.get_num_threads()} threads",
              "command": "python " + " ".join(sys.argv), "args": vars(a), "train_blocks": len(train),
              "eval_tokens": len(test) * (a.block - 1), "archs": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)

    for arch in a.archs.split(","):
        common = dict(per_device_train_batch_size=a.batch_size, num_train_epochs=a.epochs, learning_rate=a.lr,
                      warmup_steps=50, lr_scheduler_type="cosine", seed=a.seed, report_to=[], save_strategy="no",
                      logging_steps=50, disable_tqdm=True, use_cpu=True)
        spam_model, plain_model = build(arch, a, len(tok)), build(arch, a, len(tok))
        spam = SpamTrainer(model=spam_model, train_dataset=train, data_collator=default_data_collator,
                           args=SpamTrainingArguments(output_dir=os.path.join(a.work_dir, arch), **common,
                                                      marglik_frequency=a.marglik_frequency,
                                                      marglik_burn_in=a.marglik_frequency, curvature_max_rows=512,
                                                      temperature=a.temperature))
        t0 = time.time()
        spam.train()
        t1 = time.time()
        need_plain = a.methods.split(",") != ["spam-opd"]  # the baselines prune a plain model
        if need_plain:
            Trainer(model=plain_model, train_dataset=train, data_collator=default_data_collator,
                    args=TrainingArguments(output_dir=os.path.join(a.work_dir, arch + "-plain"), **common)).train()
        t2 = time.time()
        if need_plain:
            posthoc = SpamTrainer(model=plain_model, train_dataset=train, data_collator=default_data_collator,
                                  args=SpamTrainingArguments(output_dir=os.path.join(a.work_dir, arch + "-ph"),
                                                             **common, marglik_frequency=0, curvature_max_rows=512))
            posthoc.fit_priors_posthoc(max_batches=a.posthoc_batches)
        res = {"train_s": {"spam": t1 - t0, "plain": t2 - t1},
               "dense": {"perplexity": perplexity(spam_model, test), **model_costs(spam_model, a.block)},
               "dense_plain": {"perplexity": perplexity(plain_model, test) if need_plain else None}, "runs": []}
        result["archs"][arch] = res
        save()
        print(f"{arch}: dense perplexity SpaM {res['dense']['perplexity']:.2f}, plain "
              f"{res['dense_plain']['perplexity'] or float('nan'):.2f}", flush=True)
        for method in a.methods.split(","):
            trainer = spam if method == "spam-opd" else posthoc
            model = trainer.model
            score_method = "opd" if method.endswith("-opd") else method
            granularities = [("", False), ("/kv-groups", True)] if arch == "llama" else [("", False)]
            for suffix, kv_only in granularities:
                specs = group_specs(model, kv_groups_only=kv_only)
                for s in map(float, a.sparsities.split(",")):
                    p = plan(model, trainer.posterior, s, method=score_method, budget="params", flops_seq_len=a.block,
                             prune_seed=a.seed, kv_groups_only=kv_only, specs=specs)
                    sel = p.selection
                    pruned = apply(copy.deepcopy(model), p)
                    run = {"method": method + suffix, "sparsity": s, "achieved": sel.achieved,
                           "perplexity": perplexity(pruned, test), **model_costs(pruned, a.block)}
                    res["runs"].append(run)
                    save()
                    print(f"{arch} {method + suffix:>21} {s:.0%}: perplexity {run['perplexity']:.2f}", flush=True)
    result["wall_s"] = sum(sum(r["train_s"].values()) for r in result["archs"].values())
    save()
    plot(result, os.path.splitext(a.out)[0] + ".png")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["archs"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        res = result["archs"][arch]
        for method in dict.fromkeys(r["method"] for r in res["runs"]):
            pts = sorted((r["sparsity"], r["perplexity"]) for r in res["runs"] if r["method"] == method)
            dense = res["dense" if method.startswith("spam-opd") else "dense_plain"]["perplexity"]
            ax.plot([0] + [p[0] for p in pts], [dense] + [p[1] for p in pts], marker="o", label=method,
                    linestyle="--" if method.endswith("/kv-groups") else "-")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (prunable block parameters removed)")
        ax.set_ylabel("test perplexity (log scale)")
        ax.set_title(f"{arch}-shaped, WikiText-2")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
