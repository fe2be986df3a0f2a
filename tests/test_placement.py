"""``compress --device-map``: a dispatched model (blocks offloaded to disk) is compressed post hoc block by block to
the same export as the model in memory; what it cannot do is refused before loading."""

import json
import os

import pytest
import torch

from spam_hf.arguments import ModelArguments
from spam_hf.cli import main
from spam_hf.export import from_pretrained

from conftest import FAST, tiny_lm_batch

DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_compress_with_blocks_offloaded_to_disk_exports_the_same_model(tiny_lm_setup, monkeypatch):
    import spam_hf.pruning.sequential as sequential
    from spam_hf.offload import offloaded_modules, onloaded

    offloaded = []

    def recording(block, changed=True):  # which blocks the pruning found offloaded
        offloaded.append(bool(offloaded_modules(block)))
        return onloaded(block, changed)

    monkeypatch.setattr(sequential, "onloaded", recording)
    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    assert json.load(open(os.path.join(model_dir, "config.json")))["num_hidden_layers"] == 2
    common = ["compress", model_dir, "--train-file", train, "--validation-file", valid, "--training", "none",
              "--sparsity", "0.4", "--calibration-batches", "2", *FAST]
    assert main(common + ["--sequential", "True", "--output-dir", str(tmp / "memory")]) == 0
    assert not any(offloaded)
    assert main(common + ["--device-map", json.dumps(DISK), "--offload-folder", str(tmp / "offload"),
                          "--output-dir", str(tmp / "dispatched")]) == 0
    reports = [json.load(open(tmp / run / "pruning_report.json")) for run in ("memory", "dispatched")]
    assert reports[1]["sequential"] and reports[1]["selection"] == reports[0]["selection"]
    assert offloaded[-4:] == [False, True, False, True]  # block 1 on disk, in the budget and compression passes
    x = tiny_lm_batch(seed=5)["input_ids"]
    with torch.no_grad():
        expected = from_pretrained(str(tmp / "memory" / "model"))(x).logits
        torch.testing.assert_close(from_pretrained(str(tmp / "dispatched" / "model"))(x).logits, expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--training", "spam"], "post-hoc compression (--training none)"),
    (["--training", "none", "--sequential", "False"], "prunes block by block"),
    (["--training", "none", "--recovery-steps", "2"], "no recovery fine-tune"),
    (["--training", "none", "--method", "opd"], "curvature of every module at once"),
    (["--training", "none", "--lora-r", "4"], "LoRA ranks"),
])
def test_what_a_dispatched_model_cannot_do_is_refused_before_loading(tiny_lm_setup, capsys, extra, message):
    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    out = tmp / "refused"
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", valid, "--device-map", "auto",
                 "--output-dir", str(out), *FAST, *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_mixture_of_experts_is_not_dispatched(tiny_lm_setup, capsys):
    model_dir, train, valid, tmp = tiny_lm_setup("qwen3_moe")
    out = tmp / "refused"
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", valid, "--device-map", "auto",
                 "--training", "none", "--output-dir", str(out), *FAST]) == 2
    assert "not supported for qwen3_moe" in capsys.readouterr().err and not out.exists()


def test_dry_run_refuses_what_the_job_would(tiny_lm_setup, capsys):
    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    assert main(["compress", model_dir, "--train-file", train, "--device-map", "auto", "--dry-run", "True",
                 "--output-dir", str(tmp / "never")]) == 2
    assert "post-hoc compression (--training none)" in capsys.readouterr().err
    assert main(["compress", model_dir, "--train-file", train, "--device-map", "auto", "--dry-run", "True",
                 "--training", "none", "--output-dir", str(tmp / "never")]) == 0
    assert "block by block" in capsys.readouterr().out


def test_placement_arguments():
    assert ModelArguments().placement() == {}
    args = ModelArguments(device_map="auto", max_memory='{"0": "70GiB", "cpu": "200GiB"}', offload_folder="off")
    assert args.placement() == {"device_map": "auto", "max_memory": {0: "70GiB", "cpu": "200GiB"},
                                "offload_folder": "off"}
    assert ModelArguments(device_map='{"model.layers.0": "disk"}').placement() == {
        "device_map": {"model.layers.0": "disk"}}
    with pytest.raises(ValueError, match="--device-map is not a JSON object"):
        ModelArguments(device_map="{model.layers.0: disk}")
    with pytest.raises(ValueError, match="--max-memory places a model loaded with --device-map"):
        ModelArguments(max_memory='{"cpu": "1GiB"}')
