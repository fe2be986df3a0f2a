"""Self-contained families: a family added from one file (tests/toy_family.py) is grouped, pruned, exported
with its own runtime module and reloads where spam_hf cannot be imported."""

import json
import os

import torch

from spam_hf import SpamLaplace, apply, from_pretrained, plan, save_pruned
from spam_hf.architectures import get_family, group_specs, supported_model_types
from spam_hf.pruning import mask_groups

from conftest import assert_remote_load, close_parents, tiny_lm_batch
import toy_family


def tiny_opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, ffn_dim=48, num_hidden_layers=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_family_from_one_file_prunes_exports_and_reloads_without_spam_hf(tmp_path):
    assert "opt" in supported_model_types() and isinstance(get_family(tiny_opt()), toy_family.ToyOptFamily)
    model, batch = tiny_opt(), tiny_lm_batch()
    specs = group_specs(model)
    assert [s.kind for s in specs] == ["head", "neuron", "head", "neuron"]
    # layer 0 loses every head (the family's runtime module), layer 1 half of its heads and neurons
    keep = {specs[0].name: torch.tensor([], dtype=torch.long), specs[1].name: torch.arange(0, 48, 2),
            specs[2].name: torch.tensor([1, 3]), specs[3].name: torch.arange(24)}
    masked = mask_groups(tiny_opt(), specs, close_parents(specs, dict(keep)))
    from spam_hf.pruning import prune_groups

    prune_groups(model, keep)
    assert isinstance(model.model.decoder.layers[0].self_attn, toy_family.OptNoHeads)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(expected, masked(**batch).logits, atol=1e-5, rtol=1e-5)
    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "remote_code"
    cfg = json.load(open(os.path.join(out, "config.json")))["spam_pruning"]
    assert list(cfg["opt_no_heads"]) == ["model.decoder.layers.0.self_attn"]
    assert cfg["module_attrs"] == {"model.decoder.layers.1.self_attn": {"num_heads": 2}}
    assert "class OptNoHeads(ZeroHeadAttention)" in open(os.path.join(out, "modeling_spam.py")).read()
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(out).eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert assert_remote_load(out, "AutoModelForCausalLM", batch, expected, tmp_path) == "SpamOPTForCausalLM"


def test_the_toy_family_goes_through_the_posterior_and_the_plan():
    model, batch = tiny_opt(), tiny_lm_batch()
    la = SpamLaplace(model, n_data=36)
    with la.capture(model, batch["attention_mask"]):
        out = model(**batch)
    la.accumulate(out.logits, batch["labels"])
    p = plan(model, la, 0.5)
    assert p.achieved >= 0.5 and {r["layer"] for r in p.to_dict()["layers"]} == {0, 1}
    apply(model, p)
    assert sum(s.count for s in group_specs(model)) < 2 * (4 + 48)
