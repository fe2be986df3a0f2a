"""ONNX export: uneven (remote-code) and stock exports become graphs that ONNX Runtime alone runs with the pruned
model's outputs, at batch sizes and lengths other than the trace's."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.cli import main
from spam_hf.export import save_pruned
from spam_hf.export.onnx import (ONNX_FILE, REPORT_FILE, compare_onnx_latency, export_onnx, input_names,
                                 sample_batch)
from spam_hf.pruning import prune_groups

from conftest import close_parents, random_keep, tiny_causal_lm, tiny_classifier, tiny_tokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def pruned_export(tmp_path, model_type, uniform=False):
    """A tiny model of ``model_type`` with groups removed (unevenly, one layer's attention emptied, and for LLaMA
    query heads 0, 1, 3 reading KV heads 0, 0, 1; or ``uniform``: every other neuron of every layer), saved with
    its tokenizer. Returns ``(model, folder, kind)``. Phi-3's per-layer config copies, OLMo 2's kept-rows norms,
    MPNet's kept-heads position bias, ModernBERT's fused rows and Mixtral's routed experts (every expert on every token
    in the graph) trace like the rest."""
    classifier = model_type in ("bert", "distilbert", "roberta", "mpnet", "modernbert")
    model = tiny_classifier(model_type) if classifier else tiny_causal_lm(model_type)
    specs = group_specs(model)
    if uniform:
        keep = {s.name: torch.arange(0, s.count, 2) for s in specs if s.kind == "neuron"}
    else:
        keep = random_keep(specs, seed=5, drop_all_layer=0)
        if model_type == "llama":
            keep["layer1.head"] = torch.tensor([0, 1, 3])
            close_parents(specs, keep)
    prune_groups(model, keep)
    out = str(tmp_path / f"{model_type}-export")
    kind = save_pruned(model, out, tokenizer=tiny_tokenizer(str(tmp_path / "tok")))
    return model, out, kind


def run_in_onnxruntime_only(onnx_path, feeds, tmp_path):
    """The graph's first output on ``feeds``, computed in a fresh Python where torch, transformers and spam_hf
    cannot be imported (only onnxruntime and numpy)."""
    np.savez(str(tmp_path / "feeds.npz"), **feeds)
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "spam_hf"):
                    raise ImportError(name + " is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import onnxruntime as ort
        feeds = dict(np.load({str(tmp_path / 'feeds.npz')!r}))
        session = ort.InferenceSession({onnx_path!r}, providers=["CPUExecutionProvider"])
        np.save({str(tmp_path / 'out.npy')!r}, session.run(None, feeds)[0])
        print("ORT_OK", sorted(sys.modules.keys() & {{"torch", "transformers", "spam_hf"}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert "ORT_OK []" in res.stdout, res.stderr[-3000:]
    return np.load(str(tmp_path / "out.npy"))


def reference(model, batch):
    with torch.no_grad():
        kwargs = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
        return model(**batch, **kwargs).logits.numpy()


@pytest.mark.parametrize("model_type", ["bert", "llama", *[pytest.param(t, marks=pytest.mark.slow) for t in (
    "distilbert", "gpt2", "phi3", "olmo2", "mpnet", "modernbert", "mixtral")]])
def test_uneven_export_runs_in_onnxruntime_alone(tmp_path, model_type):
    model, folder, kind = pruned_export(tmp_path, model_type)
    assert kind == "remote_code"
    out = str(tmp_path / "onnx")
    result = export_onnx(folder, out)
    assert sorted(os.listdir(out)) == sorted(["config.json", ONNX_FILE, ONNX_FILE + ".data", REPORT_FILE,
                                              "tokenizer.json", "tokenizer_config.json"])
    assert result.max_abs_diff <= 1e-4 and result.opset >= 18 and result.output == "logits"
    assert json.load(open(os.path.join(out, REPORT_FILE)))["inputs"] == result.inputs
    assert "auto_map" not in json.load(open(os.path.join(out, "config.json")))  # no modeling file travels with it
    # real sentences at a batch size and length the trace never saw, padded; the in-memory pruned model is the truth
    batch = sample_batch(model, tiny_tokenizer(str(tmp_path / "tok")), result.inputs, batch=3, max_length=40,
                         offset=20)
    assert batch["attention_mask"].min() == 0 and batch["input_ids"].shape[1] != 16
    got = run_in_onnxruntime_only(os.path.join(out, ONNX_FILE), {k: v.numpy() for k, v in batch.items()}, tmp_path)
    expected = reference(model, batch)
    if expected.ndim == 3:  # token outputs: compare the positions that are not padding
        keep = batch["attention_mask"].numpy().astype(bool)
        got, expected = got[keep], expected[keep]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "bert", "qwen3_moe"])
def test_uniform_and_stock_checkpoints_export(tmp_path, model_type):
    """A uniform (stock) export and an unpruned stock checkpoint export the same way (a stock mixture of experts is
    split first: the stock block's loop over the experts a batch hits does not trace)."""
    model, folder, kind = pruned_export(tmp_path, model_type, uniform=True)
    assert kind == "stock"
    result = export_onnx(folder, str(tmp_path / "onnx-uniform"))
    assert result.model_class == type(model).__name__ and result.max_abs_diff <= 1e-4
    dense = str(tmp_path / "dense")
    (tiny_classifier("bert") if model_type == "bert" else tiny_causal_lm(model_type)).save_pretrained(dense)
    result = export_onnx(dense, str(tmp_path / "onnx-dense"))
    assert result.inputs[:2] == ["input_ids", "attention_mask"]  # no tokenizer in the folder: the default inputs


def test_bare_encoder_exports_its_hidden_states(tmp_path):
    from transformers import AutoModel

    from conftest import tiny_config

    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(str(tmp_path / "enc"))
    tiny_tokenizer(str(tmp_path / "enc"))
    result = export_onnx(str(tmp_path / "enc"), str(tmp_path / "onnx"))
    assert result.output == "last_hidden_state" and result.inputs == ["input_ids", "attention_mask", "token_type_ids"]


def test_a_graph_that_disagrees_with_pytorch_is_not_written(tmp_path):
    _, folder, _ = pruned_export(tmp_path, "bert")
    out = tmp_path / "onnx"
    with pytest.raises(ValueError, match="differ from PyTorch's"):
        export_onnx(folder, str(out), atol=1e-30)
    assert not out.exists() and not any(p.name.startswith(".onnx.partial") for p in tmp_path.iterdir())


def test_bad_input_is_refused_before_loading(tmp_path, monkeypatch):
    _, folder, _ = pruned_export(tmp_path, "bert")
    with pytest.raises(ValueError, match="holds MODEL_DIR"):
        export_onnx(folder, str(tmp_path))  # would replace the model being exported
    with pytest.raises(ValueError, match="holds MODEL_DIR"):
        export_onnx(folder, folder, overwrite=True)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="opset must be >= 18"):
        export_onnx(folder, str(tmp_path / "o"), opset=13)
    with pytest.raises(ValueError, match="atol must be > 0"):
        export_onnx(folder, str(tmp_path / "o"), atol=0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA adapter"):
        export_onnx(str(adapter), str(tmp_path / "o"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(ValueError, match=r"needs onnxruntime: pip install 'spam-hf\[onnx\]'"):
        export_onnx(folder, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_input_names_follow_the_tokenizer_and_the_forward():
    model = tiny_causal_lm("llama")
    assert input_names(model) == ["input_ids", "attention_mask"]
    tok = type("T", (), {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]})()
    assert input_names(model, tok) == ["input_ids", "attention_mask"]  # LLaMA's forward takes no token_type_ids
    assert input_names(tiny_classifier("bert"), tok) == ["input_ids", "attention_mask", "token_type_ids"]


def test_cli_export_and_errors(tmp_path, capsys):
    _, folder, _ = pruned_export(tmp_path, "distilbert")
    assert main(["export", folder, "--format", "onnx"]) == 0
    assert f"wrote {folder}-onnx/model.onnx" in capsys.readouterr().out
    assert main(["export", folder]) == 2  # the default output folder is not empty now
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert main(["export", folder, "--format", "gguf"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["export"]) == 2
    assert "needs MODEL_DIR" in capsys.readouterr().err
    assert main(["export", "--help"]) == 0
    assert "--opset" in capsys.readouterr().out


@pytest.mark.slow
def test_onnx_latency_comparison_times_both_graphs(tmp_path):
    _, folder, _ = pruned_export(tmp_path, "bert", uniform=True)
    dense = str(tmp_path / "dense")
    tiny_classifier("bert").save_pretrained(dense)
    export_onnx(folder, str(tmp_path / "p"))
    export_onnx(dense, str(tmp_path / "d"))
    res = compare_onnx_latency(str(tmp_path / "d" / ONNX_FILE), str(tmp_path / "p" / ONNX_FILE), batch_size=2,
                               seq_len=8, repeats=3, threads=1)
    assert res["dense_s"] > 0 and res["pruned_s"] > 0 and res["speedup_q25"] <= res["speedup"] <= res["speedup_q75"]
    assert (res["batch_size"], res["seq_len"], res["threads"]) == (2, 8, 1)
