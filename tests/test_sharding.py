"""FSDP2: the helpers for sharded weights, and two processes (torchrun, gloo, CPU) with the model sharded by
transformers' ``DistributedConfig(fsdp_size=2)`` against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from spam_hf.kron import Precision
from spam_hf.marglik import SquaredWeights
from spam_hf.priors import _precision_rows, _RankOnePenalty
from spam_hf.sharding import assign_owners, is_sharded, local_rows, owned, squared_sums

from test_distributed import free_port

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *map(str, args)]


def test_owners_are_contiguous_runs_of_about_equal_size():
    sizes = {f"m{i}": s for i, s in enumerate([4, 4, 4, 4, 10, 2, 2, 2, 4, 4])}
    owners = assign_owners(sizes, 2)
    ranks = list(owners.values())
    assert ranks == sorted(ranks) and set(ranks) == {0, 1}  # contiguous, both processes own some
    held = [sum(s for m, s in sizes.items() if owners[m] == r) for r in (0, 1)]
    assert abs(held[0] - held[1]) <= max(sizes.values()), held  # balanced to within one module
    assert assign_owners(sizes, 1) == {m: 0 for m in sizes}
    assert owned(owners, sizes, 1) == [m for m in sizes if owners[m] == 1] and owned(None, ["a"], 1) == ["a"]


def test_a_plain_tensor_is_its_own_shard():
    w = torch.randn(5, 3)
    local, offset = local_rows(w)
    assert local is w and offset == 0 and not is_sharded(w)
    b = torch.randn(5)
    rows, cols, full = squared_sums(w, b, keep_full=True)
    ref = SquaredWeights.of(torch.cat([w, b.unsqueeze(1)], dim=1).double())
    torch.testing.assert_close(rows, ref.row_sums)
    torch.testing.assert_close(cols, ref.col_sums)
    torch.testing.assert_close(full, ref.full)


@pytest.mark.parametrize("dense", [False, True])
def test_the_penalty_of_row_shards_sums_to_the_whole(dense):
    """What each process of a sharded layer computes (its rows, their precisions): the values add up to the whole
    layer's ``Σ_ij Δ_ij [W | b]²_ij``, and each row's gradient is the whole layer's (brute force; float32, as the penalty
    computes)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    prec = Precision(dense=torch.rand(7, 5, generator=g) + 0.1) if dense else \
        Precision(u=torch.rand(7, generator=g) + 0.1,
                  v=torch.rand(5, generator=g) + 0.1)
    whole = (prec.matrix() * torch.cat([w, b.unsqueeze(1)], dim=1).square()).sum()
    grad_w, grad_b = torch.autograd.grad(whole, (w, b))
    total = 0.0
    for start, n in ((0, 4), (4, 3)):  # two processes' rows, as FSDP2 splits 7 rows
        ws, bs = w[start: start + n], b[start: start + n]
        part = _precision_rows(prec, start, n)
        if part.is_rank_one:
            term = _RankOnePenalty.apply(ws, bs, part.u, part.v)
        else:
            term = part.quadratic(torch.cat([ws, bs.unsqueeze(1)], dim=1).square())
        gw, gb = torch.autograd.grad(term, (w, b))
        torch.testing.assert_close(gw[start: start + n], grad_w[start: start + n])
        torch.testing.assert_close(gb[start: start + n], grad_b[start: start + n])
        assert not gw[:start].any() and not gw[start + n:].any()
        total = total + term.detach()
    torch.testing.assert_close(total, whole.detach())


def test_conv1d_layers_are_refused_for_sharding():
    """A sharded model reaching SpamLaplace from Python is checked by the same family hook as `compress --fsdp2`:
    GPT-2's Conv1D weights are stored in × out, so FSDP2's row shards would be input columns; a mixture of experts
    would split its sharded 3-D expert tensors. Refused by name; Linear families pass."""
    from conftest import tiny_causal_lm

    from spam_hf.posterior import check_shardable

    with pytest.raises(ValueError, match="cannot train gpt2 sharded by FSDP2: its Conv1D weights"):
        check_shardable(tiny_causal_lm("gpt2"))
    with pytest.raises(ValueError, match="cannot train mixtral sharded by FSDP2: .*3-D tensors"):
        check_shardable(tiny_causal_lm("mixtral"))
    check_shardable(tiny_causal_lm("llama"))  # Linear layers: nothing to say


def test_families_that_cannot_be_sharded_are_refused_before_loading():
    from spam_hf.arguments import LoraArguments
    from spam_hf.jobs.compress import check_shardable

    with pytest.raises(ValueError, match="not supported for gpt2: its Conv1D weights"):
        check_shardable("gpt2", LoraArguments())
    with pytest.raises(ValueError, match="not supported for mixtral: .*FSDP2 shards as 3-D tensors"):
        check_shardable("mixtral", LoraArguments())
    with pytest.raises(ValueError, match="with LoRA"):
        check_shardable("llama", LoraArguments(lora_r=4))
    check_shardable("llama", LoraArguments())
    check_shardable("bert", LoraArguments())


def run_worker(model_dir, out, processes, prior, prune="rounds"):
    cmd = [WORKER, model_dir, out, "--batch", 8 // processes, "--prior", prior, "--prune", prune]
    cmd = torchrun(*cmd, "--fsdp2") if processes > 1 else [sys.executable, *map(str, cmd)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(processes)]
    return torch.load(os.path.join(out, "result.pt")), ranks


@pytest.fixture
def one_process_mesh():
    """A process group of this process alone and its 1-D CPU mesh: FSDP2 shards over it (every weight a
    ``DTensor`` of one shard), enough to run the sharded code paths in the test process; torn down after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def fully_sharded(model, mesh):
    """``model`` sharded by FSDP2 block by block, then at the root (transformers' plan at load also makes the
    embedding and the norm with the head units of their own)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_a_sharded_model_is_pruned_where_it_is_block_by_block(one_process_mesh):
    """``prune`` on an FSDP2 model: block by block (the engine chooses it), each block gathered into a plain copy
    of its own class, cut, and sharded again in place; the groups and logits are those of the same pruning of the
    plain model, and the model is still sharded after. All blocks at once is refused in one line."""
    import copy

    from conftest import tiny_causal_lm, tiny_lm_batch

    from spam_hf.pruning import prune
    from spam_hf.sharding import is_sharded_model

    plain = tiny_causal_lm("llama").double()
    sharded = fully_sharded(copy.deepcopy(plain), one_process_mesh)
    batches = [tiny_lm_batch(batch=4, seq=12, seed=s) for s in range(2)]
    options = dict(sparsity=0.5, method="damage-obs", compensate=True, calibration_batches=2)
    want = prune(plain, None, calibration=batches, sequential=True, **options)
    got = prune(sharded, None, calibration=batches, **options)
    assert got.config.sequential and {k: v.tolist() for k, v in got.selection.keep.items()} == \
        {k: v.tolist() for k, v in want.selection.keep.items()}
    # every weight is back to its shards: the stopped forwards and the backward to the outputs left none gathered
    assert is_sharded_model(sharded) and all(is_sharded(p) for p in sharded.parameters())
    assert [p.shape for p in sharded.parameters()] == [p.shape for p in plain.parameters()]
    batch = tiny_lm_batch(batch=2, seq=12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=batch["input_ids"]).logits,
                                   plain(input_ids=batch["input_ids"]).logits, rtol=1e-9, atol=1e-12)
    other = fully_sharded(tiny_causal_lm("llama").double(), one_process_mesh)
    with pytest.raises(ValueError, match="pruned block by block .*--sequential False"):
        prune(other, None, calibration=batches, sequential=False, **options)
    with pytest.raises(ValueError, match="pruned block by block .*needs every module's statistics"):
        prune(other, None, calibration=batches, sparsity=0.5, method="damage", calibration_batches=2)


def test_a_replaced_block_releases_its_shards(one_process_mesh):
    """The root FSDP unit keeps a reference to every unit it initialised: a block replaced by its pruned copy must
    give its shards' memory back itself, or each process keeps its rows of every unpruned block."""
    from conftest import tiny_causal_lm

    from spam_hf.sharding import release_shards

    model = fully_sharded(tiny_causal_lm("llama"), one_process_mesh)
    block = model.model.layers[0]
    assert all(p.to_local().untyped_storage().nbytes() > 0 for p in block.parameters())
    release_shards(block)
    assert all(p.to_local().untyped_storage().nbytes() == 0 for p in block.parameters())
    assert all(p.to_local().untyped_storage().nbytes() > 0 for p in model.model.layers[1].parameters())


def test_a_block_that_is_not_as_its_config_builds_it_is_refused(one_process_mesh):
    """The plain copy of a sharded block is built from the config: a block whose shapes differ (an already pruned
    model) is refused by name instead of being copied wrong."""
    from conftest import tiny_causal_lm

    from spam_hf.sharding import unsharded_copy

    model = tiny_causal_lm("llama")
    mlp = model.model.layers[0].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :4].detach().clone())
    fully_sharded(model, one_process_mesh)
    with pytest.raises(ValueError, match="block 0: mlp.down_proj.weight is .* its config builds"):
        unsharded_copy(model.model.layers[0], model.config, 0)
    copy = unsharded_copy(model.model.layers[1], model.config, 1)
    assert not any(is_sharded(p) for p in copy.parameters())
    torch.testing.assert_close(copy.mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight.full_tensor())


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["unit", "parameter"])
def test_fsdp2_equals_one_process(tmp_path, prior):
    """2 FSDP2 processes × batch 4 against 1 process × batch 8 (the same global batches, a float64 LLaMA): the
    priors agree to 1e-6 relative, pruning keeps the same groups and the pruned model the same logits; each
    process held half the curvature sums of one process (the owners' halves add up to them)."""
    from conftest import tiny_causal_lm

    model_dir = str(tmp_path / "tiny")
    tiny_causal_lm("llama").double().save_pretrained(model_dir)
    one, (solo,) = run_worker(model_dir, str(tmp_path / "one"), 1, prior)
    two, ranks = run_worker(model_dir, str(tmp_path / "two"), 2, prior)
    assert [r["sharded"] for r in ranks] == [True, True] and not solo["sharded"]
    for k, v in one["priors"].items():
        torch.testing.assert_close(two["priors"][k], v, rtol=1e-6, atol=0.0)
    assert two["kept"] == one["kept"] and ranks[0]["kept"] == ranks[1]["kept"] == one["kept"]
    torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-6, atol=1e-9)
    held = [r["peak_curvature_bytes"] for r in ranks]
    assert sum(held) == solo["peak_curvature_bytes"] and max(held) <= 0.6 * solo["peak_curvature_bytes"], held


@pytest.mark.slow
def test_sharded_pruning_equals_one_process(tmp_path):
    """Block by block, a sharded model is pruned where it is: 2 FSDP2 processes × batch 4 against 1 process ×
    batch 8 (float64, the empirical Fisher so that no label is sampled per process) keep the same groups and give
    the same pruned logits to 1e-6, in memory and from the export the main process writes; no process ever held
    more than one block gathered, and every weight of the pruned model is still sharded, each process holding its
    rows of every pruned block; a training step of the pruned model gives the one-process gradients."""
    from conftest import tiny_causal_lm

    model_dir = str(tmp_path / "tiny")
    tiny_causal_lm("llama").double().save_pretrained(model_dir)
    one, (solo,) = run_worker(model_dir, str(tmp_path / "one"), 1, "unit", prune="sharded")
    two, ranks = run_worker(model_dir, str(tmp_path / "two"), 2, "unit", prune="sharded")
    assert two["kept"] == one["kept"] and ranks[0]["kept"] == ranks[1]["kept"] == one["kept"]
    torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-6, atol=1e-9)
    # the export the main process wrote from the sharded model reloads with the same logits
    torch.testing.assert_close(two["export_logits"], one["export_logits"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(two["export_logits"], two["logits"], rtol=1e-9, atol=1e-12)
    # the blocks sharded anew train as FSDP2 units: each process's rows, the gradients averaged over processes
    assert set(two["grads"]) == set(one["grads"]) and len(one["grads"]) == len(solo["block_params"]) * 9
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-6, atol=1e-12)
    assert solo["block_params"] == ranks[0]["block_params"] and max(solo["block_params"]) < solo["dense_block_params"]
    for r in ranks:
        assert r["still_sharded"] and r["most_gathered"] == r["dense_block_params"]
    assert [a + b for a, b in zip(ranks[0]["local_block_params"], ranks[1]["local_block_params"])] == \
        solo["block_params"]


@pytest.mark.slow
def test_compress_fsdp2_under_torchrun_writes_one_export(tiny_lm_setup):
    """``torchrun --nproc_per_node 2 -m spam_hf.cli compress --fsdp2``: trained sharded (the log names the engine),
    pruned data parallel, one export written by the main process, which loads with the reported parameter count;
    the run re-prunes in one process; checkpoints of a sharded run are refused before training."""
    from conftest import FAST

    from spam_hf.cli import main
    from spam_hf.export import from_pretrained

    model_dir, train, valid, tmp = tiny_lm_setup()
    out = tmp / "run"
    common = ["-m", "spam_hf.cli", "compress", model_dir, "--train-file", train, "--validation-file", valid,
              "--sparsity", "0.5", "--fsdp2", "--ddp_backend", "gloo", *FAST]
    res = subprocess.run(torchrun(*common, "--output-dir", out, "--save_strategy", "no", "--recovery-steps", "2"),
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "spam-hf runs FSDP2: 2 processes" in log and "curvature sums owned per module" in log
    # pruned where it is, block by block, then recovered sharded
    assert "prunes the FSDP2-sharded model where it is" in log and "sequential: block 1:" in log
    assert "data parallel" not in log and "recovery: 2 steps" in log
    assert res.stdout.count("exported to") == 1
    report = json.load(open(out / "pruning_report.json"))
    assert report["selection"]["sparsity_achieved"] >= 0.5 and report["sequential"] is True
    assert f"{report['metric']}_before_recovery" in report["pruned"]
    model = from_pretrained(str(out / "model"))
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["params"]
    assert not [f for f in os.listdir(out) if ".partial-" in f]
    # the run re-prunes in one process: the dense/ state holds every owner's curvature diagonal (it used to stop on
    # the run's --ddp_backend gloo without a process group)
    assert main(["prune", str(out), "--sparsity", "0.7", "--measure-latency", "False"]) == 0
    assert json.load(open(out / "pruned-0.7" / "pruning_report.json"))["selection"]["sparsity_achieved"] >= 0.7
    # the accelerate command: an FSDP config with use_cpu (which accelerate runs as plain processes) and
    # --fsdp2, which shards; without --use_cpu the Trainer would count one process of the two, refused
    config = tmp / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\nnum_machines: 1\nnum_processes: 2\n"
                      f"machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\n"
                      "mixed_precision: 'no'\nuse_cpu: true\n")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)] + common[:-2 - len(FAST)]
    cpu = FAST.index("--use_cpu")
    fast = FAST[:cpu] + FAST[cpu + 2:]
    # with all blocks at once (--sequential False) the sharded model cannot be pruned where it is: each process
    # prunes an unsharded copy, and the log says why
    res = subprocess.run(accelerate + fast + ["--use_cpu", "True", "--output-dir", str(tmp / "acc"),
                                              "--save_strategy", "no", "--sequential", "False"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "spam-hf runs FSDP2: 2 processes" in log and (tmp / "acc" / "model").is_dir()
    assert "cannot be pruned where it is (--sequential False scores all blocks at once)" in log
    assert "prunes the FSDP2-trained model data parallel" in log
    res = subprocess.run(accelerate + fast + ["--output-dir", str(tmp / "acc1"), "--save_strategy", "no"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "2 processes were launched, but the Trainer counts 1" in res.stderr
    assert not (tmp / "acc1").exists()
    # transformers refuses checkpoints of a model sharded at load unless they hold the weights only; spam-hf
    # refuses those too (each process owns part of the curvature)
    res = subprocess.run(torchrun(*common, "--output-dir", tmp / "ckpt", "--save_strategy", "steps",
                                  "--save_only_model", "True"), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "checkpoints of an FSDP2-sharded SpaM run are not supported" in res.stderr
    assert not (tmp / "ckpt" / "model").exists()


def test_saved_state_of_a_sharded_posterior_has_no_live_sums():
    """Under FSDP2 each process holds only its modules' live sums, so the state a run saves (dense/, read back
    by `spam-hf prune` and `SpamTrainer.unsharded`) leaves them out; pruning reads the retained diagonal, which
    every process has whole. (One process with every module owned by rank 0 stands in for the owners.)"""
    from conftest import tiny_batch, tiny_classifier
    from test_posterior import feed

    from spam_hf import SpamLaplace

    model = tiny_classifier("bert", num_labels=3)
    la = SpamLaplace(model, n_data=64)
    feed(la, model, [tiny_batch(seed=s) for s in range(2)])
    tensors, meta = la.state_dict()
    assert any(k.startswith("curvature.") for k in tensors) and meta["live_curvature"]
    la.curvature.owners = {m: 0 for m in la.curvature.module_names}
    tensors, meta = la.state_dict()
    assert not any(k.startswith("curvature.") for k in tensors) and not meta["live_curvature"]
