"""Export: pruned checkpoints load with AutoModel (remote code, spam_hf not importable) and spam_hf.from_pretrained."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.surgery import prune_groups

from conftest import tiny_batch, tiny_classifier, tiny_tokenizer
from test_surgery import random_keep


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


def test_remote_code_loads_without_spam_hf(tmp_path):
    """AutoModelForSequenceClassification.from_pretrained(..., trust_remote_code=True) in a Python where
    importing spam_hf fails."""
    model = tiny_classifier("bert")
    prune_groups(model, random_keep(group_specs(model), seed=5, drop_all_layer=0))
    batch = tiny_batch()
    expected = logits(model, batch)
    out = str(tmp_path / "export")
    save_pruned(model, out)
    torch.save({"batch": batch, "expected": expected}, str(tmp_path / "io.pt"))
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
        from transformers import AutoModelForSequenceClassification
        m = AutoModelForSequenceClassification.from_pretrained({out!r}, trust_remote_code=True).eval()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        b = io["batch"]
        with torch.no_grad():
            got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(got, io["expected"], atol=1e-5, rtol=1e-5)
        print("REMOTE_OK", type(m).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert "REMOTE_OK SpamBertForSequenceClassification" in res.stdout, res.stderr[-3000:]


def test_unpruned_export_is_stock(tmp_path):
    model = tiny_classifier("bert")
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    assert "modeling_spam.py" not in os.listdir(out)
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tiny_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))
