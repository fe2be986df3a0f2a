"""Tiny random models built from configs (no downloads) shared by the tests."""

import os

# before anything imports huggingface_hub, which reads these once at import: the suite never reaches the Hub,
# whether or not the shell that runs it set them
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from spam_hf.architectures.base import weight_out_in  # noqa: E402
from spam_hf.curvature import CurvatureAccumulator  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    common = dict(vocab_size=100, max_position_embeddings=64, num_labels=3)
    if model_type == "distilbert":
        kw = dict(dim=32, n_heads=4, hidden_dim=48, n_layers=2, dropout=0.0, attention_dropout=0.0)
    else:
        kw = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if model_type in ("roberta", "xlm-roberta"):
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
        if model_type == "electra":
            kw.update(embedding_size=32)
        if model_type == "modernbert":  # local attention over 4 tokens in every other layer, global in the others
            kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                      local_attention=4, global_attn_every_n_layers=2, mlp_dropout=0.0, attention_dropout=0.0,
                      embedding_dropout=0.0)
    kw.update(common)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_classifier(model_type: str = "bert", seed: int = 0, **overrides):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, **overrides))
    model.eval()
    return model


def tiny_batch(batch: int = 4, seq: int = 10, vocab: int = 100, n_labels: int = 3, pad_last: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[1:, seq - pad_last:] = 0
        ids[1:, seq - pad_last:] = 0
    labels = torch.randint(0, n_labels, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


ENCODER_TYPES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta-v2", "modernbert"]


@pytest.fixture
def bert():
    return tiny_classifier("bert")


class BatchList(list):
    """A list of batches that reads as a DataLoader where a job needs one: ``len(.dataset)`` is the row count."""

    @property
    def dataset(self):
        return range(sum(len(b["labels"]) for b in self))


def tiny_tokenizer(directory):
    """A real BertTokenizerFast over a 100-word vocabulary written to ``directory``."""
    from transformers import BertTokenizerFast

    os.makedirs(directory, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=path)


def write_tsv(path, n, seed, label_col="label", labels=(0, 1)):
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write(f"sentence\t{label_col}\n")
        for i in range(n):
            y = labels[i % len(labels)]
            words = [f"w{rng.randrange(10, 95)}" for _ in range(rng.randrange(3, 10))]
            if y == labels[-1]:
                words[rng.randrange(len(words))] = "w7"
            f.write(" ".join(words) + f"\t{y}\n")
    return str(path)


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny BERT classifier + tokenizer saved to disk, and small train/dev TSV files."""
    model_dir = str(tmp_path / "tiny-bert")
    model = tiny_classifier("bert", num_labels=2)
    model.save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    train = write_tsv(tmp_path / "train.tsv", 64, 0)
    dev = write_tsv(tmp_path / "dev.tsv", 24, 1)
    return model_dir, train, dev, tmp_path


DECODER_TYPES = ["gpt2", "llama", "mistral", "qwen2", "granite", "smollm3", "gemma2", "gemma3_text", "phi3",
                 "olmo2", "mixtral", "qwen3_moe"]
#: mixture-of-experts sizes of the tiny configs: 4 experts, 2 per token (Qwen3-MoE's own default is 128 of 768)
MOE_SIZES = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)}


def tiny_decoder_config(model_type: str, **overrides):
    """A 2-layer decoder config: 4 query heads of width 8; LLaMA-layout ones with 2 KV heads (GQA); mixtures of
    experts with :data:`MOE_SIZES`."""
    from transformers import AutoConfig

    if model_type == "gpt2":
        kw = dict(n_embd=32, n_head=4, n_inner=48, n_layer=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        kw = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                  num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(vocab_size=100, num_labels=3, **MOE_SIZES.get(model_type, {}))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_decoder_config(model_type, **overrides))
    model.eval()
    return model


def tiny_lm_batch(batch: int = 3, seq: int = 12, vocab: int = 100, seed: int = 0):
    """Token blocks with ``labels = input_ids`` (the causal-LM convention; the model shifts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def write_text(path, n_lines, seed):
    """Plain text in the tiny tokenizer's vocabulary (a repeating pattern a model can learn)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            start = rng.randrange(10, 60)
            f.write(" ".join(f"w{start + (k % 7)}" for k in range(rng.randrange(6, 20))) + "\n")
    return str(path)


@pytest.fixture
def tiny_lm_setup(tmp_path):
    """A tiny LLaMA causal LM + tokenizer saved to disk and train/valid text files; returns a factory by type."""
    def make(model_type="llama"):
        model_dir = str(tmp_path / f"tiny-{model_type}")
        tiny_causal_lm(model_type).save_pretrained(model_dir)
        tok = tiny_tokenizer(model_dir)
        tok.eos_token = "[SEP]"
        tok.save_pretrained(model_dir)
        return (model_dir, write_text(tmp_path / "train.txt", 120, 0), write_text(tmp_path / "valid.txt", 40, 1),
                tmp_path)
    return make


# ---------------------------------------------------------------- helpers shared by several test files
#: CLI flags that make a compress run on the tiny models take seconds
FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--marglik_frequency", "2",
        "--marglik_burn_in", "2", "--n_hypersteps", "3", "--curvature_every", "1", "--use_cpu", "True",
        "--measure_latency", "False", "--max_seq_length", "16", "--disable_tqdm", "True", "--flops_seq_len", "16"]


def zero_group(model, spec, g):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for m, idx in spec.row_index.items():
            weight_out_in(mods[m])[idx[g]] = 0
            if mods[m].bias is not None:
                mods[m].bias[idx[g]] = 0
        for m, idx in spec.col_index.items():
            weight_out_in(mods[m])[:, idx[g]] = 0


def dense_ggn_block(model, layer_name, x):
    """Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n for the augmented [W | b] of one layer (row-major)."""
    layer = model.get_submodule(layer_name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    w_key, b_key = f"{layer_name}.weight", f"{layer_name}.bias"

    def f(wb):
        p = dict(params)
        p[w_key] = wb[:, :-1]
        p[b_key] = wb[:, -1]
        return torch.func.functional_call(model, p, (x,))

    wb = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], 1)
    J = torch.func.jacrev(f)(wb).reshape(x.shape[0], -1, wb.numel())  # [N, C, P]
    probs = f(wb).softmax(-1)
    lam = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


def expected_kfac(model, layer_name, x):
    """KFAC of the exact GGN of one example: Σ_c p_c (g_c g_cᵀ ⊗ a aᵀ), via the empirical accumulator per label."""
    probs = model(x).softmax(-1)[0].detach()
    total = 0
    for c in range(probs.numel()):
        acc = CurvatureAccumulator(model, [layer_name], fisher="empirical")
        with acc.capture(model):
            out = model(x)
        acc.accumulate(out, torch.tensor([c]))
        kron = acc.kron(n_data=1, keep_vectors=True)[layer_name]
        total = total + probs[c] * kron.dense()
    return total


def random_keep(specs, seed, drop_all_layer=None):
    """Random kept groups per spec; a KV head is kept exactly when some kept query head reads it."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for s in specs:
        if drop_all_layer is not None and s.layer == drop_all_layer:
            keep[s.name] = torch.tensor([], dtype=torch.long)
            continue
        n = int(torch.randint(0, s.count + 1, (1,), generator=g))
        keep[s.name] = torch.randperm(s.count, generator=g)[:n].sort().values
    return close_parents(specs, keep)


def close_parents(specs, keep):
    """``keep`` with every parent spec (KV heads, experts) set to the groups its kept children read (over every
    child spec: an expert's neurons are one spec per expert)."""
    read = {}
    for s in specs:
        if s.parent:
            read.setdefault(s.parent, []).append(s.parent_index[keep[s.name]])
    for parent, groups in read.items():
        keep[parent] = torch.cat(groups).unique()
    return keep


def direct_accuracy(model, tokenizer, tsv_path, max_length, limit=None):
    """Accuracy of ``model`` on a ``sentence<TAB>label`` file by a plain loop (the reference the jobs'
    reported numbers are checked against): one sentence at a time, argmax of the logits."""
    with open(tsv_path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    rows = rows[:limit] if limit else rows
    model.eval()
    correct = 0
    with torch.no_grad():
        for sentence, label in rows:
            enc = tokenizer(sentence, truncation=True, max_length=max_length, return_tensors="pt")
            correct += int(model(**enc).logits.argmax(-1).item() == int(label))
    return correct / len(rows)


def assert_remote_load(out, auto, batch, expected, tmp_path, gen=None):
    """Load the export at ``out`` with ``transformers.<auto>.from_pretrained(trust_remote_code=True)`` in a
    fresh Python where spam_hf cannot be imported; its logits must equal ``expected`` (and greedy
    generation ``gen`` when given). Returns the loaded class name."""
    import subprocess
    import sys
    import textwrap

    torch.save({"batch": batch, "expected": expected, "gen": gen}, str(tmp_path / "io.pt"))
    script = textwrap.dedent(f"""
        import sys, types
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "spam_hf" or name.startswith("spam_hf."):
                    raise ImportError("spam_hf is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import spam_hf
            raise SystemExit("spam_hf was importable")
        except ImportError:
            pass
        import torch
        from transformers import {auto}
        m = {auto}.from_pretrained({out!r}, trust_remote_code=True).eval()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        b = io["batch"]
        with torch.no_grad():
            got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(got, io["expected"], atol=1e-5, rtol=1e-5)
        if io["gen"] is not None:
            ids = b["input_ids"]
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(g, io["gen"])
        print("REMOTE_OK", type(m).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert "REMOTE_OK" in res.stdout, res.stderr[-3000:]
    return res.stdout.split("REMOTE_OK")[1].split()[0]


def lm_logits(model, ids):
    """A causal LM's logits for ``input_ids`` (no grad)."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model, ids, new_tokens: int = 6):
    """Greedy ``generate()`` of ``new_tokens`` after ``ids`` (unpadded)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0)


class LogitsOf(torch.nn.Module):
    """``input_ids -> logits`` of a transformers model (what :func:`dense_ggn_block` / :func:`expected_kfac` call)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def uneven_keep(specs):
    """Layer 0 keeps heads 1 and 3 (of 4), every other layer none; every other neuron: uneven heads, a layer with an
    empty attention, and narrower MLPs in one keep."""
    return {s.name: (torch.tensor([1, 3]) if s.layer == 0 else torch.tensor([], dtype=torch.long))
            if s.kind == "head" else torch.arange(0, s.count, 2) for s in specs}
