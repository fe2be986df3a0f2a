"""GPT-2 family: Conv1D layers (weights stored in × out) and the fused c_attn."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spam_hf.architectures import group_specs, prunable_modules
from spam_hf.curvature import CurvatureAccumulator

from conftest import tiny_causal_lm, tiny_lm_batch
from conftest import zero_group


def test_head_group_owns_its_thirds_of_c_attn():
    model = tiny_causal_lm("gpt2")
    head = group_specs(model)[0]
    E, d = 32, 8
    rows = head.row_index["transformer.h.0.attn.c_attn"]
    assert rows.shape == (4, 3 * d)
    assert rows[1].tolist() == [*range(8, 16), *range(E + 8, E + 16), *range(2 * E + 8, 2 * E + 16)]
    assert head.col_index["transformer.h.0.attn.c_proj"][1].tolist() == list(range(8, 16))
    # parameters per head: 3d rows of c_attn with bias (in = E) + d columns of c_proj (out = E)
    assert head.params_per_group(model).tolist() == [3 * d * (E + 1) + d * E] * 4


def test_zeroing_head_equals_masking_its_context():
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm("gpt2"), tiny_causal_lm("gpt2")
    spec = group_specs(model)[2]  # layer 1 heads
    zero_group(model, spec, 3)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 24:32] = 0
        return (x,)

    ref.get_submodule("transformer.h.1.attn.c_proj").register_forward_pre_hook(pre_hook)
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, ref(batch["input_ids"]).logits,
                                   atol=1e-6, rtol=1e-5)


def dense_ggn_conv1d(model, name, x):
    """Σ_n J_nᵀ (diag p − p pᵀ) J_n w.r.t. the ``out × (in+1)`` view ``[Wᵀ | b]`` of a Conv1D layer."""
    layer = model.get_submodule(name)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(wb):
        p = dict(params)
        p[f"{name}.weight"] = wb[:, :-1].T  # Conv1D stores in × out
        p[f"{name}.bias"] = wb[:, -1]
        return torch.func.functional_call(model, p, (x,))

    wb = torch.cat([layer.weight.detach().T, layer.bias.detach().unsqueeze(1)], 1)
    J = torch.func.jacrev(f)(wb).reshape(x.shape[0], -1, wb.numel())
    probs = f(wb).softmax(-1)
    lam = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


@pytest.mark.parametrize("layer", ["0", "2"])
def test_conv1d_kfac_equals_exact_ggn_for_one_example(layer):
    """Hooks see Conv1D inputs/outputs in the out × in convention: KFAC of one example == the dense GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    probs = model(x).softmax(-1)[0].detach()
    total = 0
    for c in range(3):  # exact expectation over labels of the empirical-Fisher KFAC
        acc = CurvatureAccumulator(model, [layer], fisher="empirical")
        with acc.capture(model):
            out = model(x)
        acc.accumulate(out, torch.tensor([c]))
        total = total + probs[c] * acc.kron(n_data=1, keep_vectors=True)[layer].dense()
    torch.testing.assert_close(total, dense_ggn_conv1d(model, layer, x), atol=1e-6, rtol=1e-6)


def test_every_prunable_weight_gets_curvature():
    model = tiny_causal_lm("gpt2").train()
    specs = group_specs(model)
    modules = prunable_modules(specs)
    assert len(modules) == 8 and all(isinstance(model.get_submodule(m), Conv1D) for m in modules)
    acc = CurvatureAccumulator(model, modules, reduction="expand", likelihood="causal_lm")
    batch = tiny_lm_batch()
    with acc.capture(model, batch["attention_mask"]):
        out = model(**batch)
    acc.accumulate(out.logits, batch["labels"])
    assert float(acc.n) == batch["input_ids"].numel()
    for m, s in acc.sums.items():
        assert s["A"].abs().sum() > 0 and s["G"].abs().sum() > 0, m
    assert acc.sums["transformer.h.0.attn.c_attn"]["G"].shape == (96, 96)  # 3E outputs
    assert acc.sums["transformer.h.0.mlp.c_proj"]["A"].shape == (49, 49)  # 48 neurons + bias


def test_cross_attention_is_rejected():
    model = tiny_causal_lm("gpt2", add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention is not supported"):
        group_specs(model)


def test_zeroing_neuron_equals_zeroing_activation():
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm("gpt2"), tiny_causal_lm("gpt2")
    zero_group(model, group_specs(model)[1], 11)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 11] = 0
        return (x,)

    ref.get_submodule("transformer.h.0.mlp.c_proj").register_forward_pre_hook(pre_hook)
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, ref(batch["input_ids"]).logits,
                                   atol=1e-6, rtol=1e-5)
