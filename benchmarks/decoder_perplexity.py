"""Decoder pruning: perplexity before/after removing heads (KV groups) and neurons, SpaM + OPD vs baselines.

A small LLaMA-shaped (GQA) and a GPT-2-shaped model are trained from random weights with SpamTrainer
(unit priors, KFAC with token-level "expand" curvature) on WikiText-2 ``valid.txt``, with a byte-level
BPE tokenizer trained on the same file. Each method then prunes a copy of the same trained model to
each sparsity (fraction of prunable block parameters, global), and perplexity is measured on the
first ``--eval-blocks`` blocks of ``test.txt``. No recovery fine-tune. Results go to a JSON file
(rewritten after every measurement) and a PNG plot.

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
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, default_data_collator  # noqa: E402

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf.costs import model_costs  # noqa: E402
from spam_hf.scoring import group_scores  # noqa: E402
from spam_hf.selection import select_groups  # noqa: E402
from spam_hf.surgery import prune_groups  # noqa: E402

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
    p.add_argument("--methods", default="spam-opd,fisher,magnitude,random")
    p.add_argument("--sparsities", default="0.3,0.5,0.7")
    p.add_argument("--marglik-frequency", type=int, default=100)
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
        model = build(arch, a, len(tok))
        args = SpamTrainingArguments(
            output_dir=os.path.join(a.work_dir, arch), per_device_train_batch_size=a.batch_size,
            num_train_epochs=a.epochs, learning_rate=a.lr, warmup_steps=50, lr_scheduler_type="cosine",
            seed=a.seed, report_to=[], save_strategy="no", logging_steps=50, disable_tqdm=True, use_cpu=True,
            marglik_frequency=a.marglik_frequency, marglik_burn_in=a.marglik_frequency, curvature_max_rows=512)
        trainer = SpamTrainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
        t0 = time.time()
        trainer.train()
        res = {"train_s": time.time() - t0, "dense": {"perplexity": perplexity(model, test),
                                                      **model_costs(model, a.block)}, "runs": []}
        result["archs"][arch] = res
        save()
        print(f"{arch}: dense perplexity {res['dense']['perplexity']:.2f} ({res['train_s']:.0f} s training)", flush=True)
        curv = trainer.retained_curvature()
        for method in a.methods.split(","):
            score_method = "opd" if method == "spam-opd" else method
            scores = group_scores(model, trainer.specs, score_method, prior=trainer.prior,
                                  curvature=None if score_method in ("magnitude", "random") else curv, seed=a.seed)
            for s in map(float, a.sparsities.split(",")):
                pruned = copy.deepcopy(model)
                sel = select_groups(pruned, trainer.specs, scores, s, budget="params", seq_len=a.block)
                prune_groups(pruned, sel.keep)
                run = {"method": method, "sparsity": s, "achieved": sel.achieved,
                       "perplexity": perplexity(pruned, test), **model_costs(pruned, a.block)}
                res["runs"].append(run)
                save()
                print(f"{arch} {method:>9} {s:.0%}: perplexity {run['perplexity']:.2f}", flush=True)
    result["wall_s"] = sum(r["train_s"] for r in result["archs"].values())
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
            ax.plot([0] + [p[0] for p in pts], [res["dense"]["perplexity"]] + [p[1] for p in pts], marker="o",
                    label=method)
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
