"""Export: pruned checkpoints load with AutoModel (remote code, spam_hf not importable) and spam_hf.from_pretrained."""

import json
import os

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import prune_groups

from conftest import DECODER_TYPES, tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch, tiny_tokenizer
from conftest import assert_remote_load, close_parents, random_keep


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_export_round_trip(tmp_path, model_type):
    model = tiny_classifier(model_type)
    prune_groups(model, random_keep(group_specs(model), seed=2, drop_all_layer=1))
    batch = tiny_batch()
    expected = logits(model, batch)
    out = str(tmp_path / "export")
    kind = save_pruned(model, out, tokenizer=tiny_tokenizer(str(tmp_path / "tok")))
    assert kind == "remote_code"
    files = os.listdir(out)
    assert "model.safetensors" in files and "modeling_spam.py" in files and "tokenizer.json" in files
    assert not any(f.endswith(".bin") for f in files)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["spam_pruning"]["linear_shapes"] and "1" in json.dumps(cfg["spam_pruning"]["empty_attention"])
    assert list(cfg["auto_map"]) == ["AutoModelForSequenceClassification"]
    loaded = from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "phi3"])
def test_remote_code_loads_without_spam_hf(tmp_path, model_type):
    """AutoModelFor*.from_pretrained(..., trust_remote_code=True) in a Python where importing spam_hf fails
    (GPT-2: Conv1D shapes, head counts and a zero-neuron MLP rebuilt by the remote code; LLaMA: uneven
    query heads per KV head through gathered K/V projections; Phi-3: a per-layer head count on the attention's
    own config copy; generate() too)."""
    if model_type == "bert":
        model, auto, batch = tiny_classifier("bert"), "AutoModelForSequenceClassification", tiny_batch()
    else:
        model, auto, batch = tiny_causal_lm(model_type), "AutoModelForCausalLM", tiny_lm_batch()
    specs = group_specs(model)
    keep = random_keep(specs, seed=5, drop_all_layer=0)
    if model_type == "gpt2":
        keep[specs[-1].name] = torch.tensor([], dtype=torch.long)  # last MLP loses every neuron
    if model_type == "llama":
        keep["layer1.head"] = torch.tensor([0, 1, 3])  # KV head 0 read twice, KV head 1 once
        close_parents(specs, keep)
    if model_type == "phi3":
        keep["layer1.head"] = torch.tensor([1])  # one KV group of two in layer 1 (none in layer 0)
    prune_groups(model, keep)
    expected = logits(model, batch)
    ids = batch["input_ids"]
    gen = greedy(model, ids) if model_type != "bert" else None
    out = str(tmp_path / "export")
    save_pruned(model, out)
    assert assert_remote_load(out, auto, batch, expected, tmp_path, gen=gen) == f"Spam{type(model).__name__}"


def test_unpruned_export_is_stock(tmp_path):
    model = tiny_classifier("bert")
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    assert "modeling_spam.py" not in os.listdir(out)
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tiny_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))


def greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_export_round_trip_and_generate(tmp_path, model_type):
    model = tiny_causal_lm(model_type)
    prune_groups(model, random_keep(group_specs(model), seed=6, drop_all_layer=1))
    ids = tiny_lm_batch()["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "remote_code"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert list(cfg["auto_map"]) == ["AutoModelForCausalLM"]
    loaded = from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "granite", "smollm3", "gemma2", "gemma3_text",
                                        "phi3"])
def test_uniform_decoder_result_exports_as_stock(tmp_path, model_type):
    """Same number of KV groups / neurons in every layer: a stock config, no remote code."""
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(model_type)
    keep = {}
    for s in group_specs(model):
        if s.kind == "neuron":
            keep[s.name] = torch.arange(0, s.count, 2)  # every other neuron
        elif s.kind == "head" and model_type != "gpt2":  # GPT-2 derives head_dim from n_embd / n_head
            keep[s.name] = torch.tensor([2, 3]) if s.parent else torch.tensor([1])  # KV head 1 (Phi-3: group 1)
        elif s.kind == "kv_head":
            keep[s.name] = torch.tensor([1])
    prune_groups(model, keep)
    ids = tiny_lm_batch()["input_ids"]
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    assert "modeling_spam.py" not in os.listdir(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in cfg and "spam_pruning" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))
    if model_type != "gpt2":
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 1, 24)


def test_no_supported_family_reads_per_layer_config():
    """transformers' ``per_layer_config`` (heterogeneous configs) could carry uneven widths without remote code,
    but only where a family's modeling code reads it. In transformers 5.25 no family spam-hf supports does (only
    Gemma 4 / EmbeddingGemma 2 read per-layer head_dim and KV heads, dots3 experts, NeoMMe windows; none reads a
    per-layer MLP width or query-head count), so exports write ``spam_pruning`` + ``modeling_spam.py`` instead.
    This fails when a supported family starts reading it: then write it in the export (issue 28, item 6)."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from spam_hf.architectures import supported_model_types

    readers = []
    for model_type in supported_model_types():
        modeling = inspect.getsourcefile(getattr(transformers, MODEL_MAPPING_NAMES[model_type]))
        if "per_layer_config" in open(modeling).read():
            readers.append(model_type)
    gemma4 = inspect.getsourcefile(transformers.Gemma4TextModel)
    assert "per_layer_config" in open(gemma4).read()  # the check can see a reader where there is one
    assert readers == [], f"{readers} now read per_layer_config: export uneven layers through it"
