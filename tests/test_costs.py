"""model_costs against hand counts of a tiny BERT; measure_latency's bookkeeping."""

import pytest
import torch

from spam_hf.costs import compare_latency, measure_latency, model_costs
from spam_hf.pruning import prune_groups

from conftest import tiny_classifier


def hand_count(hidden=32, heads=4, head_dim=8, inter=48, layers=2, seq=16, kept_heads=(4, 4), kept_neurons=(48, 48)):
    """Block parameters and FLOPs of the BERT layout, counted by hand: Q/K/V rows + O columns per head,
    up rows + down columns per neuron, plus the O and down biases no group owns. A layer with no neurons
    left counts no MLP: its down bias is outside every group and no longer prunable."""
    params = flops = 0
    for h, n in zip(kept_heads, kept_neurons):
        w_attn = 3 * h * head_dim * hidden + hidden * h * head_dim
        w_mlp = n * hidden + hidden * n
        params += w_attn + 3 * h * head_dim + hidden + (w_mlp + n + hidden if n else 0)
        flops += 2 * seq * (w_attn + w_mlp) + 4 * seq**2 * head_dim * h
    return params, flops


def test_costs_equal_hand_counts_before_and_after_pruning():
    model = tiny_classifier("bert")
    costs = model_costs(model, seq_len=16)
    params, flops = hand_count()
    assert costs["block_params"] == params and costs["block_flops"] == flops
    assert costs["params"] == sum(p.numel() for p in model.parameters())
    keep = {"layer0.head": torch.tensor([1]), "layer0.neuron": torch.arange(10),
            "layer1.head": torch.arange(4), "layer1.neuron": torch.tensor([], dtype=torch.long)}
    prune_groups(model, keep)
    costs = model_costs(model, seq_len=16)
    params, flops = hand_count(kept_heads=(1, 4), kept_neurons=(10, 0))
    assert costs["block_params"] == params and costs["block_flops"] == flops


def test_latency_reports_what_it_measured():
    model = tiny_classifier("bert")
    model.train()
    threads = torch.get_num_threads()
    res = measure_latency(model, batch_size=2, seq_len=200, repeats=3, warmup=1, threads=1)
    assert res["seq_len"] == 64  # clipped to max_position_embeddings
    assert res["throughput_seq_per_s"] == pytest.approx(2 / res["latency_s"])
    assert res["threads"] == 1 and torch.get_num_threads() == threads and model.training


class _FakeClock:
    """``time.perf_counter`` that moves only when a fake model "runs": timings independent of the machine's load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _Sleeper(torch.nn.Module):
    """A 'model' whose forward advances ``clock`` by the next of ``delays`` seconds and logs its name."""

    def __init__(self, name, delays, log, clock):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"vocab_size": 100, "max_position_embeddings": 16})()
        self.name, self.delays, self.log, self.clock = name, list(delays), log, clock

    def forward(self, input_ids, attention_mask):
        self.log.append(self.name)
        self.clock.now += self.delays.pop(0)


def test_compare_latency_interleaves_and_reports_the_spread(monkeypatch):
    import spam_hf.costs as costs

    clock = _FakeClock()
    monkeypatch.setattr(costs, "time", clock)
    log = []
    dense, pruned = _Sleeper("d", [0.008] * 6, log, clock), _Sleeper("p", [0.002] * 6, log, clock)
    res = compare_latency(dense, pruned, batch_size=2, seq_len=8, repeats=5, warmup=1)
    assert log == ["d", "p", "p", "d", "d", "p", "p", "d", "d", "p", "p", "d"]  # alternating order, both timed each round
    assert [res[k] for k in ("speedup", "speedup_q25", "speedup_q75")] == pytest.approx([4.0, 4.0, 4.0])
    assert res["dense_s"] == pytest.approx(0.008) and res["pruned_s"] == pytest.approx(0.002) and res["trusted"]
    # a pruned model whose time jumps between runs: the spread says the number cannot be trusted
    noisy = _Sleeper("p", [0.002, 0.002, 0.008, 0.002, 0.008, 0.002], [], clock)
    res = compare_latency(_Sleeper("d", [0.008] * 6, [], clock), noisy, batch_size=2, seq_len=8, repeats=5, warmup=1)
    assert not res["trusted"]
