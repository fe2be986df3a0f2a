"""Data parallel SpaM: two processes (torchrun, gloo, CPU) give the one-process run's priors and pruning."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from spam_hf.curvature import sampled_loss
from spam_hf.distributed import broadcast_object, is_distributed, is_main_process, shard_offset, shutdown

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out, batch, processes, prior, curvature, *extra):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, WORKER, str(out), "--batch", str(batch), "--prior", prior, "--curvature", curvature,
           *map(str, extra)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + cmd[1:]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"))


def test_helpers_are_the_identity_in_one_process():
    assert not is_distributed() and is_main_process()
    assert shard_offset(5) == (0, 5)
    assert broadcast_object({"a": 1}) == {"a": 1}
    shutdown()  # no process group: nothing to wait for or destroy


def test_processes_launched_must_be_those_the_trainer_counts(monkeypatch):
    """accelerate with use_cpu starts two processes that a Trainer without --use_cpu counts as one: refused."""
    from spam_hf.distributed import check_process_count

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_process_count(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_process_count(2)
    with pytest.raises(ValueError, match="2 processes were launched, but the Trainer counts 1.*--use_cpu True"):
        check_process_count(1)


def test_monte_carlo_labels_follow_the_predictive_distribution():
    """Labels drawn by inversion of the CDF: frequencies match p(y | f) (10,000 rows, 4 standard errors)."""
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).repeat(10_000, 1).requires_grad_()
    sampled_loss(logits, None, "classification", "mc", torch.Generator().manual_seed(0)).backward()
    # d/dlogits of Σ CE(logits, y) = p - onehot(y): the column sums give the label counts
    counts = (torch.softmax(logits.detach(), -1) - logits.grad).sum(0)
    expected = torch.tensor([0.2, 0.5, 0.3]) * 10_000
    assert torch.all((counts - expected).abs() < 4 * (expected * (1 - expected / 10_000)).sqrt()), counts


@pytest.mark.slow
@pytest.mark.parametrize("prior,curvature", [("unit", "diag"), ("layer", "kfac")])
def test_two_processes_equal_one_process(tmp_path, prior, curvature):
    """torchrun with 2 processes × batch 8 against 1 process × batch 16 (the same global batches): the priors
    after training agree to 1e-6 relative, and both processes take the one-process run's pruning decisions
    (a one-shot OPD plan, then damage-exact in two rounds with compensation) and function.

    (Unit priors with KFAC are left out: their log-determinant bound is taken in the eigenbasis of each
    module's ``G``, which round-off alone can rotate where eigenvalues coincide, so a different order of
    the same sums moves them; README "Scaling out".)"""
    one = run_worker(tmp_path / "one", 16, 1, prior, curvature)
    two = run_worker(tmp_path / "two", 8, 2, prior, curvature)
    for k, v in one["priors"].items():
        torch.testing.assert_close(two["priors"][k], v, rtol=1e-6, atol=0.0)
    assert two["one_shot"] == one["one_shot"]
    assert two["rounds"] == one["rounds"]
    # logits, not raw weights: a key bias gets no gradient (softmax ignores it) and its Adam steps are round-off
    torch.testing.assert_close(two["logits"], one["logits"], rtol=1e-6, atol=1e-9)
    ranks = [json.load(open(tmp_path / "two" / f"rank{r}.json")) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["one_shot"] == ranks[1]["one_shot"] and ranks[0]["rounds"] == ranks[1]["rounds"]


SHUTDOWN_SCRIPT = """
import json, sys, time
import torch
from spam_hf.distributed import rank, shutdown
torch.distributed.init_process_group("gloo")
r = rank()
torch.distributed.all_reduce(torch.ones(1))
if r == 0:
    time.sleep(1.0)  # the main process is still writing the export
t_enter = time.time()
shutdown()
json.dump({"enter": t_enter, "leave": time.time(), "alive": torch.distributed.is_initialized()},
          open(f"{sys.argv[1]}/shutdown{r}.json", "w"))
"""


@pytest.mark.slow
def test_shutdown_waits_for_every_process_then_leaves_the_group(tmp_path):
    """Under torchrun, a process that finishes first waits in ``shutdown`` until the main process gets there,
    and both leave the process group (exiting with a Gloo group alive could abort a process: the CI failure of
    2026-12-03, rank 1 SIGABRT after the export)."""
    script = tmp_path / "shutdown_worker.py"
    script.write_text(SHUTDOWN_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    main, other = (json.load(open(tmp_path / f"shutdown{r}.json")) for r in (0, 1))
    assert not main["alive"] and not other["alive"]
    assert other["enter"] < main["enter"] - 0.5  # rank 1 got there first ...
    assert other["leave"] >= main["enter"]  # ... and left only once the main process had arrived


@pytest.mark.slow
def test_two_process_resume_equals_the_uninterrupted_run(tmp_path):
    """A 2-process run resumed from a checkpoint taken between two prior updates (step 3: live sums of one batch
    on each process) ends with the uninterrupted 2-process run's priors, decisions and function: each process
    restores its own live sums (``spam_live_rank<r>``), not the main process's."""
    full = run_worker(tmp_path / "full", 8, 2, "unit", "diag", "--save-steps", 3)
    ckpt = tmp_path / "full" / "run" / "checkpoint-3"
    assert (ckpt / "spam_live_rank0.safetensors").exists() and (ckpt / "spam_live_rank1.safetensors").exists()
    resumed = run_worker(tmp_path / "resumed", 8, 2, "unit", "diag", "--resume", ckpt)
    for k, v in full["priors"].items():
        torch.testing.assert_close(resumed["priors"][k], v, rtol=1e-6, atol=0.0)
    assert resumed["one_shot"] == full["one_shot"] and resumed["rounds"] == full["rounds"]
    torch.testing.assert_close(resumed["logits"], full["logits"], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_compress_under_torchrun_writes_one_export(tiny_setup):
    """``torchrun --nproc_per_node 2 -m spam_hf.cli compress`` (the default pruning: damage-exact in rounds with
    compensation, then recovery steps): exit 0, one export and one report, written by the main process, and
    the recovery loss is not multiplied by the process count."""
    from conftest import FAST

    model_dir, train, dev, tmp = tiny_setup
    out = tmp / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "spam_hf.cli", "compress", model_dir, "--train-file", train,
           "--validation-file", dev, "--sparsity", "0.5", "--output-dir", str(out), "--recovery-steps", "4",
           "--ddp_backend", "gloo", "--logging_steps", "1", *FAST]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(out / "pruning_report.json"))
    assert report["selection"]["sparsity_achieved"] >= 0.5 and report["compensate"] and report["rounds"] == 2
    assert os.path.exists(out / "model" / "model.safetensors") and os.path.exists(out / "run_config.json")
    assert not [f for f in os.listdir(out) if ".partial-" in f]
    assert res.stdout.count("exported to") == 1  # one process printed the summary
    assert "spam-hf runs DDP: 2 processes" in res.stdout + res.stderr
    # the recovery Trainer's 4 logged losses are per-example means (a 2-class CE near log 2 = 0.69; it logged
    # 1.39, twice that, when the Trainer multiplied the sequence head's mean loss by the process count)
    losses = [float(json.loads(line.replace("'", '"'))["loss"]) for line in res.stdout.splitlines()
              if line.startswith("{'loss'")]
    assert len(losses) >= 4 and max(losses[-4:]) < 1.0, losses


@pytest.mark.slow
def test_fsdp_asked_for_on_the_cpu_is_refused_not_run_as_ddp(tiny_setup):
    """On the CPU, Trainer(fsdp=...) under torchrun runs DDP without a word (accelerate's use_cpu drops FSDP):
    SpamTrainer says so and stops, before training."""
    from conftest import FAST

    model_dir, train, dev, tmp = tiny_setup
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "spam_hf.cli", "compress", model_dir, "--train-file", train,
           "--validation-file", dev, "--sparsity", "0.5", "--output-dir", str(tmp / "fsdp"), "--fsdp", "full_shard",
           "--ddp_backend", "gloo", *FAST]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "but this Trainer would run DDP" in res.stderr, res.stderr[-3000:]
    assert not (tmp / "fsdp" / "model").exists()
