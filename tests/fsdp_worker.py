"""One SpaM run on a tiny LLaMA for ``tests/test_sharding.py``: alone, or under ``torchrun`` with the model sharded
by FSDP2 (transformers' ``DistributedConfig(fsdp_size=2)``).

    python tests/fsdp_worker.py MODEL_DIR OUT --batch 8
    torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL_DIR OUT --batch 4 --fsdp2

Both see the same global batches (``--batch`` is per process). The model is float64 so that what the test compares
is the algorithm, not the order of float32 sums. Every process writes ``OUT/rank<r>.json``: its rank, the most
curvature-sum bytes it held after any step, and what it kept. The main process writes ``OUT/result.pt``: the priors
after training, the groups kept by two rounds of damage-obs pruning with compensation, and the pruned model's
logits. Under ``--fsdp2`` pruning runs as ``spam-hf compress --fsdp2`` runs it. With ``--prune rounds`` (two rounds,
all blocks at once) the model is saved, read back unsharded on every process (:meth:`SpamTrainer.unsharded`) and
pruned data parallel. With ``--prune sharded`` (block by block, one round) it is pruned where it is: one block at a
time is gathered, cut and sharded again; each process then also records the most block weights it held gathered at
once and whether the pruned model is still sharded.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, default_data_collator  # noqa: E402

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf import sharding  # noqa: E402
from spam_hf.distributed import is_main_process, rank, shutdown  # noqa: E402
from spam_hf.export import from_pretrained  # noqa: E402

from conftest import tiny_lm_batch  # noqa: E402


def held_bytes(trainer) -> int:
    """Bytes of the curvature sums this process holds now."""
    return sum(t.numel() * t.element_size() for d in trainer.posterior.curvature.sums.values() for t in d.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--batch", type=int, required=True, help="per-process batch size")
    p.add_argument("--prior", default="unit")
    p.add_argument("--fsdp2", action="store_true")
    p.add_argument("--prune", choices=["rounds", "sharded"], default="rounds")
    a = p.parse_args()
    torch.set_num_threads(1)
    kw = {}
    if a.fsdp2:
        from transformers.distributed import DistributedConfig

        kw["distributed_config"] = DistributedConfig(fsdp_size=int(os.environ["WORLD_SIZE"]))
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
    rows = tiny_lm_batch(batch=32, seq=12, seed=1)
    data = Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    args = SpamTrainingArguments(output_dir=os.path.join(a.out, "run"), per_device_train_batch_size=a.batch,
                                 num_train_epochs=1, learning_rate=1e-3, report_to=[], logging_steps=2,
                                 marglik_frequency=2, marglik_burn_in=2, curvature_every=1, n_hypersteps=5,
                                 prior=a.prior, curvature="kfac", save_strategy="no", use_cpu=True, seed=0,
                                 # block by block the output factors' labels are sampled per process: the
                                 # empirical Fisher (the true labels) makes 1 and 2 processes comparable
                                 fisher_type="empirical" if a.prune == "sharded" else "mc",
                                 disable_tqdm=True,
                                 ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = SpamTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    peak = [0]
    accumulate = trainer.posterior.accumulate

    def tracked(*args, **kwargs):
        accumulate(*args, **kwargs)
        peak[0] = max(peak[0], held_bytes(trainer))

    trainer.posterior.accumulate = tracked
    trainer.train()
    priors = {k: v.detach().clone() for k, v in trainer.prior.log_delta.items()}
    sharded = trainer.sharded
    dense_block = max(sum(p.numel() for p in b.parameters()) for b in trainer.model.model.layers)
    gathered = {"most": 0}  # block weights held gathered (in plain blocks) at once
    if a.prune == "rounds":
        if sharded:
            trainer.save_model(os.path.join(a.out, "dense"))
            trainer = trainer.unsharded(from_pretrained(os.path.join(a.out, "dense")))
        result = trainer.prune(0.5, method="damage-obs", rounds=2, compensate=True, calibration_batches=2)
    else:
        copy = sharding.unsharded_copy
        layers = trainer.model.model.layers

        def counted(block, config, index):
            plain = sum(p.numel() for b in layers for p in b.parameters() if not sharding.is_sharded(p))
            out = copy(block, config, index)
            gathered["most"] = max(gathered["most"], plain + sum(p.numel() for p in out.parameters()))
            return out

        sharding.unsharded_copy = counted
        result = trainer.prune(0.5, method="damage-obs", sequential=True, compensate=True, calibration_batches=2)
    kept = {k: v.tolist() for k, v in result.keep.items()}
    blocks = trainer.model.model.layers
    with open(os.path.join(a.out, f"rank{rank()}.json"), "w") as f:
        json.dump({"rank": rank(), "sharded": sharded, "peak_curvature_bytes": peak[0], "kept": kept,
                   "dense_block_params": dense_block, "most_gathered": gathered["most"],
                   "still_sharded": all(sharding.is_sharded(p) for p in trainer.model.parameters()),
                   "block_params": [sum(p.numel() for p in b.parameters()) for b in blocks],
                   "local_block_params": [sum(sharding.local_rows(p)[0].numel() for p in b.parameters())
                                          for b in blocks]}, f)
    batch = tiny_lm_batch(batch=4, seq=12, seed=2)
    with torch.no_grad():  # every process: a sharded model's forward gathers each block from all of them
        logits = trainer.model.eval()(input_ids=batch["input_ids"]).logits
    export_logits = grads = None
    if a.prune == "sharded":
        # the export: every process calls save_model, the main process writes
        trainer.save_model(os.path.join(a.out, "export"))
        if is_main_process():
            with torch.no_grad():
                export_logits = from_pretrained(os.path.join(a.out, "export"))(input_ids=batch["input_ids"]).logits
        # a training step of the pruned model (what the recovery does): each process its own rows of one batch;
        # FSDP2 averages the gradients, so every pruned block's gradient is that of the whole batch in one process
        rows = tiny_lm_batch(batch=8, seq=12, seed=3)
        per = 8 // int(os.environ.get("WORLD_SIZE", "1"))
        mine = {k: v[rank() * per:(rank() + 1) * per] for k, v in rows.items()}
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.model(**mine).loss.backward()
        grads = {n: (p.grad.full_tensor() if sharding.is_sharded(p.grad) else p.grad).clone()
                 for n, p in trainer.model.model.layers.named_parameters() if p.grad is not None}
    if is_main_process():
        torch.save({"priors": priors, "kept": kept, "logits": logits, "history": trainer.marglik_history,
                    "export_logits": export_logits, "grads": grads}, os.path.join(a.out, "result.pt"))
    shutdown()


if __name__ == "__main__":
    main()
