"""Group specs of the encoder families: zeroing a group's slices == removing the structure by hooks."""

import pytest
import torch

from spam_hf.architectures import get_family, group_specs, supported_model_types, validate_specs
from spam_hf.architectures.base import GroupSpec

from conftest import ENCODER_TYPES, tiny_batch, tiny_classifier, zero_group


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"unknown model_type 'foo'; supported: .*bert"):
        get_family("foo")


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_registry_covers_encoder_family(model_type):
    assert model_type in supported_model_types()
    model = tiny_classifier(model_type)
    specs = group_specs(model)
    assert [s.kind for s in specs] == ["head", "neuron"] * 2
    assert all(s.count == 4 for s in specs if s.kind == "head")
    assert all(s.count == 48 for s in specs if s.kind == "neuron")


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_zeroing_head_equals_masking_its_context(model_type):
    """Zeroing head h's Q/K/V rows and O columns == zeroing its slice of the context output (forward hook)."""
    batch = tiny_batch()
    ref_model = tiny_classifier(model_type)
    model = tiny_classifier(model_type)
    specs = [s for s in group_specs(model) if s.kind == "head"]
    spec = specs[1]
    h, d = 2, 8
    zero_group(model, spec, h)
    # reference: zero the context slice h (the input of the O projection) with a pre-hook
    o_name = next(iter(spec.col_index))

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., h * d:(h + 1) * d] = 0
        return (x,)

    ref_model.get_submodule(o_name).register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(logits(model, batch), logits(ref_model, batch), atol=1e-6, rtol=1e-5)
    # and it changes the output compared with the intact model
    assert not torch.allclose(logits(model, batch), logits(tiny_classifier(model_type), batch), atol=1e-6)


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_zeroing_neuron_equals_zeroing_activation(model_type):
    batch = tiny_batch()
    ref_model = tiny_classifier(model_type)
    model = tiny_classifier(model_type)
    spec = [s for s in group_specs(model) if s.kind == "neuron"][0]
    j = 5
    zero_group(model, spec, j)
    down = next(iter(spec.col_index))

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., j] = 0
        return (x,)

    ref_model.get_submodule(down).register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(logits(model, batch), logits(ref_model, batch), atol=1e-6, rtol=1e-5)


def test_params_and_flops_per_group(bert):
    specs = group_specs(bert)
    head, neuron = specs[0], specs[1]
    H, d, I = 32, 8, 48
    assert head.params_per_group(bert).tolist() == [3 * d * (H + 1) + d * H] * 4
    assert neuron.params_per_group(bert).tolist() == [(H + 1) + H] * I
    T = 16
    f = head.flops_per_group(bert, T)
    assert torch.allclose(f, torch.full((4,), 2.0 * T * (4 * d * H) + 4.0 * T * T * d, dtype=torch.float64))
    # all groups together own every block weight (and all but the O / down biases)
    total = sum(int(s.params_per_group(bert).sum()) for s in specs)
    block = sum(p.numel() for n, p in bert.named_parameters()
                if ".encoder.layer." in n and "LayerNorm" not in n)
    assert total == block - 2 * 2 * H


def test_bad_specs_are_rejected(bert):
    good = group_specs(bert)[0]
    with pytest.raises(ValueError, match="not in the model"):
        validate_specs(bert, [GroupSpec("head", 0, 4, row_index={"nope.query": good.row_index[next(iter(good.row_index))]})])
    with pytest.raises(ValueError, match="out of range"):
        name = next(iter(good.row_index))
        validate_specs(bert, [GroupSpec("head", 0, 4, row_index={name: good.row_index[name] + 100})])
    with pytest.raises(ValueError, match="more than one group"):
        validate_specs(bert, [good, good])
    with pytest.raises(ValueError, match="unknown group kind"):
        GroupSpec("filter", 0, 1, row_index={"x": torch.zeros(1, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="expected"):
        GroupSpec("head", 0, 3, row_index={"x": torch.zeros(2, 1, dtype=torch.long)})
