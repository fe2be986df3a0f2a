"""The memory model: its factor counts are what the accumulators allocate, it reads meta models like real ones,
and block-by-block statistics are predicted below all-at-once ones where the MLP is wide."""

import torch

from spam_hf.architectures import consuming_modules, group_specs, prunable_modules
from spam_hf.curvature import CurvatureAccumulator
from spam_hf.memory import FLOAT, PROCESS_BYTES, kfac_floats, peak, predict, shape_of

from conftest import tiny_batch, tiny_classifier, tiny_decoder_config


def test_factor_count_is_what_an_accumulator_allocates():
    model = tiny_classifier("bert", num_labels=3)
    specs = group_specs(model)
    shape = shape_of(model)
    b = tiny_batch()
    for modules in (prunable_modules(specs), consuming_modules(specs)):
        acc = CurvatureAccumulator(model, modules, fisher="empirical")
        with acc.capture(model, b["attention_mask"]):
            out = model(**b)
        acc.accumulate(out.logits, b["labels"])
        # the factors (each module's row count, one float64, is not modelled)
        allocated = sum(t.numel() * t.element_size() for s in acc.sums.values() for k, t in s.items() if k != "R")
        assert allocated == FLOAT * kfac_floats(shape, modules)


def test_meta_and_real_models_give_the_same_prediction():
    from transformers import AutoModelForCausalLM

    config = tiny_decoder_config("llama")
    real = AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    kw = dict(training="spam", batch_size=2, seq_len=16, calibration_batches=4)
    assert [s.bytes for s in predict(real, **kw)] == [s.bytes for s in predict(meta, **kw)]
    assert shape_of(meta).weights == sum(p.numel() * 4 for p in real.parameters())


def test_stages_and_the_sequential_saving_at_llm_width():
    """A LLaMA of Llama-3.2-1B's widths (2 layers, on meta): block-by-block statistics hold one block's input
    factors where all at once holds every block's; no training stage without training."""
    from transformers import AutoModelForCausalLM

    config = tiny_decoder_config("llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=64, num_hidden_layers=8, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kw = dict(batch_size=4, seq_len=256, calibration_batches=8, measure_latency=False)
    posthoc = predict(model, training="none", **kw)
    assert [s.name for s in posthoc] == ["statistics", "evaluate", "export"]
    sequential = predict(model, training="none", sequential=True, **kw)
    assert sequential[0].bytes < posthoc[0].bytes
    whole = predict(model, training="spam", diagonal_from=None, **kw)[0].parts
    assert whole["curvature sums"] > predict(model, training="spam", curvature="diag", **kw)[0].parts["curvature sums"]
    # the 8192-wide factors (gate's and up's G, down's A) keep their diagonal: 8192 numbers instead of 8192²
    wide = predict(model, training="spam", **kw)[0].parts
    assert whole["curvature sums"] - wide["curvature sums"] == 4 * 8 * 3 * (8192 ** 2 - 8192)
    assert wide["prior update"] == 3 * 8 * 2048 ** 2 and whole["prior update"] == 3 * 8 * 8192 ** 2
    assert peak(sequential) >= PROCESS_BYTES + shape_of(model).weights
