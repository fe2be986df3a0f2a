"""Mixture of experts (Mixtral, Qwen3-MoE): experts split into Linear layers, expert and neuron groups, removal of
whole experts (the router chooses among the rest), and the stock or remote-code export."""

import json
import os

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs, supported_model_types
from spam_hf.architectures.moe import RoutedExperts
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import PruningConfig, mask_groups, prune, prune_groups
from spam_hf.pruning.selection import select_groups

from conftest import (BatchList, LogitsOf, assert_remote_load, close_parents, dense_ggn_block, expected_kfac, greedy,
                      lm_logits, tiny_causal_lm, tiny_decoder_config, tiny_lm_batch)

MOE = ["mixtral", "qwen3_moe"]
WIDTH = {"mixtral": 48, "qwen3_moe": 24}  # an expert's neurons in the tiny configs (4 experts, 2 per token)


@pytest.mark.parametrize("model_type", MOE)
def test_split_experts_compute_what_the_stock_block_does(model_type):
    """Splitting happens when groups are first asked for; the split block gives the stock logits, with or without a
    hook on an expert (curvature), which sees the routed tokens and their positions (spam_token_rows) and puts
    them back in the [B, T] layout with token_layout."""
    from spam_hf.curvature import token_layout

    assert model_type in supported_model_types()
    ids = tiny_lm_batch()["input_ids"]
    stock = tiny_causal_lm(model_type)
    model = tiny_causal_lm(model_type)
    specs = group_specs(model)
    assert all(isinstance(layer.mlp, RoutedExperts) for layer in model.model.layers)
    expected = lm_logits(stock, ids)
    torch.testing.assert_close(lm_logits(model, ids), expected, atol=1e-6, rtol=1e-5)
    seen = []
    handle = model.model.layers[0].mlp.routed[3].down_proj.register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[0], token_layout(m, args[0]))))
    torch.testing.assert_close(lm_logits(model, ids), expected, atol=1e-6, rtol=1e-5)
    handle.remove()
    (routed, layout), = seen
    assert layout.shape == (*ids.shape, WIDTH[model_type]) and 0 < routed < ids.numel()  # the routed tokens only
    assert int(layout.abs().amax(-1).gt(0).sum()) == routed  # at their positions, zero at the others
    assert model.model.layers[0].mlp.routed[3].down_proj.spam_token_rows is None  # only during the call
    assert torch.equal(greedy(model, ids), greedy(stock, ids))
    assert group_specs(model) and len(group_specs(model)) == len(specs)  # idempotent

    experts = next(s for s in specs if s.name == "layer0.expert")
    assert (experts.kind, experts.count) == ("expert", 4)
    assert experts.row_index["model.layers.0.mlp.router"][2].tolist() == [2]
    neurons = next(s for s in specs if s.name == "layer0.expert2.neuron")
    assert (neurons.count, neurons.parent, neurons.parent_index.unique().tolist()) == (WIDTH[model_type],
                                                                                      "layer0.expert", [2])
    assert neurons.row_index["model.layers.0.mlp.routed.2.up_proj"][5].tolist() == [5]
    assert neurons.col_index["model.layers.0.mlp.routed.2.down_proj"][5].tolist() == [5]


def test_zeroing_an_expert_neuron_equals_zeroing_its_gated_activation():
    ids = tiny_lm_batch()["input_ids"]
    model, ref = tiny_causal_lm("mixtral"), tiny_causal_lm("mixtral")
    specs = group_specs(model)
    group_specs(ref)
    mask_groups(model, specs, {"layer1.expert0.neuron": torch.tensor([g for g in range(48) if g != 7])})

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 7] = 0
        return (x,)

    ref.get_submodule("model.layers.1.mlp.routed.0.down_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(lm_logits(model, ids), lm_logits(ref, ids), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(lm_logits(model, ids), lm_logits(tiny_causal_lm("mixtral"), ids), atol=1e-6)


def test_a_masked_expert_is_routed_around():
    """Masking drops an expert from the routing (its logit at -inf): each token's top 2 come from the other experts,
    which is not what zeroing its weights alone gives (a zero expert still takes its routing weight)."""
    ids = tiny_lm_batch()["input_ids"]
    model = tiny_causal_lm("mixtral")
    specs = group_specs(model)
    chosen = []
    model.model.layers[0].mlp.router.register_forward_hook(
        lambda m, args, out: chosen.append(out.reshape(-1, out.shape[-1])))
    keep = close_parents(specs, {"layer0.expert1.neuron": torch.tensor([], dtype=torch.long)}
                         | {s.name: torch.arange(s.count) for s in specs if s.name != "layer0.expert1.neuron"
                            and s.kind != "expert"})
    zeroed = tiny_causal_lm("mixtral")
    group_specs(zeroed)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(zeroed.model.layers[0].mlp.routed[1], name).weight.zero_()
        zeroed.model.layers[0].mlp.router.weight[1] = 0
    mask_groups(model, specs, keep)
    assert model.model.layers[0].mlp.dropped == [1]
    logits = lm_logits(model, ids)
    assert not torch.allclose(logits, lm_logits(zeroed, ids), atol=1e-4)
    inputs = []  # under a hook every expert is called, with the tokens routed to it
    model.model.layers[0].mlp.routed[1].gate_proj.register_forward_hook(
        lambda m, args, out: inputs.append(args[0].shape[0]))
    torch.testing.assert_close(lm_logits(model, ids), logits)
    assert inputs == [0]  # no token reaches the dropped expert
    model.model.layers[0].mlp.dropped = []
    lm_logits(model, ids)
    assert inputs[1] > 0


@pytest.mark.parametrize("model_type", MOE)
def test_pruned_equals_masked_with_fewer_and_narrower_experts(tmp_path, model_type):
    """Layer 0: expert 1 removed, expert 2 keeps every other neuron; layer 1 keeps only expert 3 (fewer experts than
    the 2 each token asks for). Logits and greedy generation equal the masked model's, and the remote-code export
    (spam_hf.from_pretrained, and transformers with trust_remote_code where spam_hf cannot be imported) loads them."""
    ids = tiny_lm_batch()["input_ids"]
    model, masked = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    specs = group_specs(model)
    w = WIDTH[model_type]
    keep = {"layer0.expert": torch.tensor([0, 2, 3]), "layer0.expert2.neuron": torch.arange(0, w, 2),
            "layer1.expert": torch.tensor([3])}
    keep |= {s.name: torch.tensor([], dtype=torch.long) for s in specs
             if s.name in ("layer0.expert1.neuron", "layer1.expert0.neuron", "layer1.expert1.neuron",
                           "layer1.expert2.neuron")}
    mask_groups(masked, group_specs(masked), keep)
    prune_groups(model, keep)
    blocks = [layer.mlp for layer in model.model.layers]
    assert [b.widths() for b in blocks] == [[w, w // 2, w], [w]]
    assert [b.expert_ids for b in blocks] == [[0, 2, 3], [3]]
    assert [s.name for s in group_specs(model) if s.kind == "neuron"] == [
        "layer0.expert0.neuron", "layer0.expert2.neuron", "layer0.expert3.neuron", "layer1.expert3.neuron"]
    expected = lm_logits(masked, ids)
    torch.testing.assert_close(lm_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    gen = greedy(masked, ids)
    assert torch.equal(greedy(model, ids), gen)

    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "remote_code"
    entry = json.load(open(os.path.join(out, "config.json")))["spam_pruning"]["routed_experts"]
    assert entry["model.layers.1.mlp"]["widths"] == [w] and entry["model.layers.1.mlp"]["expert_ids"] == [3]
    loaded = from_pretrained(out).eval()
    torch.testing.assert_close(lm_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), gen)
    name = assert_remote_load(out, "AutoModelForCausalLM", {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              expected, tmp_path, gen=gen)
    assert name.startswith("Spam")


@pytest.mark.parametrize("model_type", MOE)
def test_the_same_experts_and_widths_everywhere_export_as_stock(tmp_path, model_type):
    """Three experts of half width in every layer (and one KV group): the blocks go back to the stock 3-D layout,
    and the config says how many experts and how wide."""
    from transformers import AutoModelForCausalLM

    ids = tiny_lm_batch()["input_ids"]
    model = tiny_causal_lm(model_type)
    specs = group_specs(model)
    w = WIDTH[model_type]
    keep = {s.name: torch.arange(0, s.count, 2) for s in specs if s.kind == "neuron"}
    keep |= {f"layer{i}.expert": torch.tensor([0, 1, 3]) for i in range(2)}
    keep |= {f"layer{i}.expert2.neuron": torch.tensor([], dtype=torch.long) for i in range(2)}
    keep |= {s.name: torch.tensor([2, 3]) for s in specs if s.kind == "head"}
    prune_groups(model, keep)
    expected = lm_logits(model, ids)
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    cfg = json.load(open(os.path.join(out, "config.json")))
    width = "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
    assert (cfg["num_local_experts"], cfg[width], cfg["num_key_value_heads"]) == (3, w // 2, 1)
    assert "spam_pruning" not in cfg and "modeling_spam.py" not in os.listdir(out)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, RoutedExperts) for m in loaded.modules())
    torch.testing.assert_close(lm_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_an_unpruned_split_model_saves_as_the_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = tiny_lm_batch()["input_ids"]
    model = tiny_causal_lm("qwen3_moe")
    group_specs(model)
    out = str(tmp_path / "same")
    assert save_pruned(model, out) == "stock"
    torch.testing.assert_close(lm_logits(AutoModelForCausalLM.from_pretrained(out), ids),
                               lm_logits(tiny_causal_lm("qwen3_moe"), ids), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", ["model.layers.0.mlp.routed.{e}.gate_proj", "model.layers.0.mlp.routed.{e}.down_proj",
                                   "model.layers.0.mlp.router"])
def test_kfac_of_an_expert_and_the_router_equals_the_exact_ggn(layer):
    """One token of a Mixtral classifier (KFAC is exact for one input vector per example), through the routing:
    the GGN of a routed expert's layer (its rows put back at their tokens under the curvature hooks, zeros for an
    expert the token does not reach) and of the router equals its Kronecker factors. An expert the token is not routed to has a zero GGN and zero
    factors."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_decoder_config("mixtral")).double().eval()
    group_specs(model)
    x = torch.tensor([[7]])
    block = model.model.layers[0].mlp
    captured = []
    handle = block.router.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    model(x)
    handle.remove()
    top = captured[0].reshape(-1).topk(2).indices.tolist()
    wrapped = LogitsOf(model)
    for e in ([top[0], next(i for i in range(4) if i not in top)] if "{e}" in layer else [None]):
        name = layer.format(e=e)
        module = model.get_submodule(name)
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=torch.float64))
        exact = dense_ggn_block(wrapped, "model." + name, x)
        assert (exact.abs().max() > 1e-6) == (e is None or e in top)  # an unrouted expert does not matter
        torch.testing.assert_close(expected_kfac(wrapped, "model." + name, x), exact, atol=1e-8, rtol=1e-6)
        module.bias = None


def test_selection_removes_whole_experts_and_single_neurons_under_one_budget():
    """Expert 2 of layer 0 scores low in every neuron: it leaves whole (router row, every neuron) at its bundle's
    score per cost; elsewhere the cheapest single neurons go. Each kept expert keeps a neuron."""
    model = tiny_causal_lm("mixtral")
    specs = group_specs(model)
    g = torch.Generator().manual_seed(0)
    scores = {s.name: 1.0 + torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}
    scores["layer0.expert2.neuron"] = torch.full((48,), 1e-3, dtype=torch.float64)
    scores["layer0.expert"] = torch.zeros(4, dtype=torch.float64)
    scores |= {s.name: torch.full((s.count,), 1e3, dtype=torch.float64) for s in specs if s.kind in ("head", "kv_head")}
    sel = select_groups(model, specs, scores, sparsity=0.4)
    assert sel.keep["layer0.expert"].tolist() == [0, 1, 3]
    assert sel.keep["layer0.expert2.neuron"].numel() == 0
    others = [s for s in specs if s.kind == "neuron" and s.name != "layer0.expert2.neuron"]
    assert all(0 < sel.keep[s.name].numel() < s.count for s in others)  # single neurons went elsewhere
    assert sel.layers[0].kept["experts"] == 3 and sel.layers[0].total["neurons"] == 4 * 48
    assert sel.layers[0].kept["neurons"] == sum(sel.keep[s.name].numel() for s in specs
                                                 if s.kind == "neuron" and s.layer == 0)


@pytest.mark.parametrize("model_type", MOE)
@pytest.mark.parametrize("sequential", [False, True])
def test_default_pruning_reaches_the_target_and_reports_what_is_left(model_type, sequential):
    """The default score in rounds (expert names stay while experts go, so rounds carry priors and the report by
    name) and block by block; the report counts each layer's experts and neurons as the model has them."""
    batches = BatchList([tiny_lm_batch(seed=s) for s in range(3)])
    model = tiny_causal_lm(model_type)
    result = prune(model, None, PruningConfig(sparsity=0.6, sequential=sequential, calibration_batches=3),
                   calibration=batches)
    assert result.achieved >= 0.6
    for layer, report in zip(model.model.layers, result.selection.layers):
        assert report.kept["experts"] == len(layer.mlp.routed)
        assert report.kept["neurons"] == sum(layer.mlp.widths())
    assert torch.isfinite(lm_logits(model, batches[0]["input_ids"])).all()


def test_dispatched_experts_are_refused_and_meta_ones_split():
    """A block under accelerate's hooks (--device-map) is refused; a model on the meta device (--dry-run's) splits."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("mixtral")
    cpu_offload(model.model.layers[0], execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="dispatched by accelerate"):
        group_specs(model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_decoder_config("qwen3_moe"))
    specs = group_specs(meta)
    assert meta.model.layers[1].mlp.routed[3].down_proj.weight.is_meta
    assert [s.count for s in specs if s.layer == 1] == [4, 2, 4, 24, 24, 24, 24]


def test_an_experts_input_factor_averages_over_the_tokens_routed_to_it():
    """Brute force: A of expert e's gate_proj is Σ x xᵀ / n_e over the n_e tokens routed to e (the block's input at
    those tokens), in the training-time accumulator (expand rows) and in the block-by-block input factors; a dense
    layer (the router) still averages over every token. Dividing by every token would shrink an expert's factor by
    its share of the tokens."""
    from spam_hf.curvature import CurvatureAccumulator
    from spam_hf.pruning.sequential import input_factors

    batch = tiny_lm_batch(batch=2, seq=10)
    batch["attention_mask"][1, 7:] = 0  # padding is never a row
    model = tiny_causal_lm("mixtral")
    group_specs(model)
    block = model.model.layers[1].mlp
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    block.router.register_forward_hook(lambda m, args, out: seen.__setitem__("top", out.detach().topk(2, -1).indices))
    mask = batch["attention_mask"].bool()
    names = [f"model.layers.1.mlp.routed.{e}.gate_proj" for e in range(4)] + ["model.layers.1.mlp.router"]
    acc = CurvatureAccumulator(model, names, likelihood="causal_lm", reduction="expand")
    with acc.capture(model, batch["attention_mask"]):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    acc.accumulate(out.logits, batch["labels"])
    x, top = seen["x"][mask].double(), seen["top"][mask]
    layer_input = {}
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: layer_input.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    handle.remove()
    block_factors = input_factors(model, model.model.layers[1], names, [(layer_input["args"], layer_input["kwargs"])],
                                  [batch["attention_mask"]])
    counts = []
    for e in range(4):
        routed = x[(top == e).any(-1)]
        counts.append(routed.shape[0])
        expected = routed.T @ routed / max(routed.shape[0], 1)
        got = acc.sums[names[e]]["A"].double() / acc.rows(names[e])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(block_factors[names[e]].double(), expected, atol=1e-5, rtol=1e-4)
    assert sum(counts) == 2 * int(mask.sum()) and 0 < min(counts) < int(mask.sum())  # 2 experts per token
    torch.testing.assert_close(acc.sums[names[4]]["A"].double() / acc.rows(names[4]), x.T @ x / x.shape[0],
                               atol=1e-5, rtol=1e-4)


def test_expert_flops_count_the_tokens_each_expert_computes_on():
    """top_k of E experts per token: an expert neuron costs 2·T·(k/E)·3H FLOPs (gate, up rows, down column), so a
    block's expert FLOPs are those of k dense MLPs, whatever E is; parameters count every expert."""
    from spam_hf.costs import model_costs

    model = tiny_causal_lm("mixtral")
    specs = group_specs(model)
    neurons = next(s for s in specs if s.name == "layer0.expert1.neuron")
    assert neurons.token_share == 0.5
    torch.testing.assert_close(neurons.flops_per_group(model, 16), torch.full((48,), 2 * 16 * 0.5 * 3 * 32.0,
                                                                             dtype=torch.float64))
    costs = model_costs(model, seq_len=16)
    attention = 2 * 16 * (32 * 32 + 2 * 32 * 16 + 32 * 32) + 4 * 16**2 * 8 * 4  # q, k, v, o; QK and AV of 4 heads
    router, experts = 2 * 16 * 32 * 4, 2 * 16 * 2 * 3 * 32 * 48  # 2 of the 4 experts' MLPs per token
    assert costs["block_flops"] == 2 * (attention + router + experts)
    assert costs["block_params"] == 2 * (4 * 32 * 32 - 2 * 32 * 16 + 32 * 4 + 4 * 3 * 32 * 48)


def test_a_lora_adapter_on_a_base_with_fewer_experts_exports_its_base(tmp_path):
    """--prune-base on a mixture of experts: split experts that no longer fit the stock block make the base
    'pruned', so the adapter's export carries it (model/base, remote code); split but untouched ones do not."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from spam_hf.export.lora import BASE_SUBDIR, base_is_pruned, save_lora_adapter

    ids = tiny_lm_batch()["input_ids"]
    base = tiny_causal_lm("mixtral")
    group_specs(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert not base_is_pruned(model)
    prune_groups(model.get_base_model(), {"layer1.expert": torch.tensor([0, 2])})
    assert base_is_pruned(model)
    expected = lm_logits(model, ids)
    out = str(tmp_path / "adapter")
    save_lora_adapter(model, out)
    loaded = PeftModel.from_pretrained(from_pretrained(os.path.join(out, BASE_SUBDIR)), out).eval()
    assert loaded.get_base_model().model.layers[1].mlp.expert_ids == [0, 2]
    torch.testing.assert_close(lm_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_an_optimizer_built_before_the_split_is_refused(tmp_path):
    """SpamTrainer splits the experts (new parameters): an optimizer over the stock model's would not train them."""
    from spam_hf import SpamTrainer, SpamTrainingArguments

    model = tiny_causal_lm("mixtral")
    args = SpamTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, n_data=10)
    with pytest.raises(ValueError, match="built before spam-hf split"):
        SpamTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    trainer = SpamTrainer(model=tiny_causal_lm("mixtral"), args=args)
    assert isinstance(trainer.model.model.layers[0].mlp, RoutedExperts)


def test_uniform_gives_every_expert_one_width_and_dense_layers_another(tmp_path):
    """Qwen3-MoE with a dense MLP in layer 0 (mlp_only_layers): --uniform shrinks the experts' neurons and the dense
    neurons each to one count (two config fields), keeps every expert, and the export is stock."""
    from transformers import AutoModelForCausalLM

    batches = BatchList([tiny_lm_batch(seed=s) for s in range(2)])
    model = tiny_causal_lm("qwen3_moe", mlp_only_layers=[0])
    result = prune(model, None, PruningConfig(sparsity=0.3, uniform=True, calibration_batches=2), calibration=batches,
                   kv_groups_only=True)
    assert result.achieved >= 0.3
    dense, experts = model.model.layers[0].mlp.up_proj.out_features, model.model.layers[1].mlp.widths()
    assert len(experts) == 4 and len(set(experts)) == 1 and (dense < 48 or experts[0] < 24)
    out = str(tmp_path / "uniform")
    assert save_pruned(model, out) == "stock"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["intermediate_size"], cfg["moe_intermediate_size"]) == (dense, experts[0])
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(lm_logits(AutoModelForCausalLM.from_pretrained(out), ids), lm_logits(model, ids),
                               atol=1e-5, rtol=1e-5)
