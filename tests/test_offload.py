"""Models dispatched by accelerate's big-model hooks: block-sequential pruning of an offloaded model is the same
pruning as of the model in memory, keeps its blocks offloaded, and exports."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from spam_hf.export import from_pretrained, save_pruned
from spam_hf.offload import execution_device, is_offloaded, offloaded_modules, onloaded
from spam_hf.pruning import PruningConfig, prune

from conftest import BatchList, tiny_causal_lm, tiny_lm_batch

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _saved_llama(tmp_path):
    model = tiny_causal_lm("llama", num_hidden_layers=3).double()
    model.save_pretrained(tmp_path / "dense")
    return model


def _disk_offloaded(tmp_path):
    """The saved model loaded with two of its three blocks offloaded to a folder (accelerate's disk offload:
    meta weights, an AlignDevicesHook on every module that holds weights)."""
    return AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=DEVICE_MAP, dtype=torch.float64,
                                                offload_folder=str(tmp_path / "offload"))


def _keep(keep):
    return {k: torch.as_tensor(v).tolist() for k, v in keep.items()}


def _meta_weights(block):
    return all(p.device.type == "meta" for p in block.parameters())


def test_onloaded_gives_real_weights_inside_and_offloads_after(tmp_path):
    dense = _saved_llama(tmp_path)
    model = _disk_offloaded(tmp_path)
    block = model.model.layers[1]
    assert is_offloaded(model) and _meta_weights(block) and execution_device(model) == torch.device("cpu")
    with onloaded(block, changed=False):
        assert not offloaded_modules(block)
        torch.testing.assert_close(block.mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert _meta_weights(block) and offloaded_modules(block)
    with onloaded(block):  # changed: new weights offloaded from CPU memory, read back by the hooks
        with torch.no_grad():
            block.mlp.down_proj.weight.mul_(2)
    assert _meta_weights(block)
    x = tiny_lm_batch(seed=3)["input_ids"]
    with torch.no_grad():
        dense.model.layers[1].mlp.down_proj.weight.mul_(2)
        torch.testing.assert_close(model(x).logits, dense(x).logits)
    with onloaded(model.model.layers[0]):  # a block in memory: nothing to do
        pass
    assert not offloaded_modules(model.model.layers[0])


@pytest.mark.parametrize("offload", ["disk", "cpu_offload"])
def test_sequential_pruning_of_an_offloaded_model_is_the_same_pruning(tmp_path, offload):
    """The same groups, the same compensated weights and logits as the model in memory; the compressed blocks stay
    offloaded (meta weights behind hooks), and the export loads with the same logits."""
    from accelerate import cpu_offload

    dense = _saved_llama(tmp_path)
    model = _disk_offloaded(tmp_path) if offload == "disk" else cpu_offload(copy.deepcopy(dense), torch.device("cpu"))
    batches = BatchList([tiny_lm_batch(batch=3, seed=s) for s in range(3)])
    config = PruningConfig(sparsity=0.5, sequential=True, calibration_batches=3)
    reference = prune(dense, None, config, calibration=batches)
    result = prune(model, None, config, calibration=batches)
    assert _keep(result.selection.keep) == _keep(reference.selection.keep)
    assert result.selection.achieved == pytest.approx(reference.selection.achieved)
    offloaded = [1, 2] if offload == "disk" else [0, 1, 2]
    for layer in offloaded:
        assert _meta_weights(model.model.layers[layer]) and offloaded_modules(model.model.layers[layer])
    x = tiny_lm_batch(seed=7)["input_ids"]
    with torch.no_grad():
        expected = dense(x).logits
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-9, atol=1e-9)
    if offload == "disk":
        save_pruned(model, str(tmp_path / "export"))
        loaded = from_pretrained(str(tmp_path / "export"), dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-9, atol=1e-9)
