"""One SpaM run on a tiny BERT for ``tests/test_distributed.py``: started alone or under ``torchrun``.

    python tests/distributed_worker.py OUT --batch 16
    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT --batch 8

Both see the same global batches (``--batch`` is per process). The model is float64 so that what the test
compares is the algorithm, not the order of float32 sums (two processes add a batch's rows in two halves).
The main process writes ``OUT/result.pt``:
the priors after training, the groups a one-shot OPD plan keeps, and after pruning in two rounds with
compensation the groups kept and the pruned model's logits on 16 training rows. Every process writes ``OUT/rank<r>.json``
(its rank and what it kept), so the test can see that all processes took the same decision.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf.distributed import is_main_process, rank, shutdown  # noqa: E402

from conftest import tiny_classifier  # noqa: E402
from test_trainer import ToyTokenizer, toy_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, required=True, help="per-process batch size")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prior", default="unit")
    p.add_argument("--curvature", default="diag")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every this many steps (0 = none)")
    p.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    a = p.parse_args()
    torch.set_num_threads(1)
    model = tiny_classifier("bert", num_labels=2).double()
    model.train()
    args = SpamTrainingArguments(output_dir=os.path.join(a.out, "run"), per_device_train_batch_size=a.batch,
                                 num_train_epochs=2, learning_rate=1e-3, report_to=[], logging_steps=2,
                                 marglik_frequency=2, marglik_burn_in=2, curvature_every=1, n_hypersteps=5,
                                 prior=a.prior, curvature=a.curvature,
                                 save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
                                 use_cpu=True, seed=0, disable_tqdm=True,
                                 ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = SpamTrainer(model=model, args=args, train_dataset=toy_dataset(a.rows),
                          data_collator=DataCollatorWithPadding(ToyTokenizer()))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=a.resume)
    train_s = time.perf_counter() - t0
    priors = {k: v.detach().clone() for k, v in trainer.prior.log_delta.items()}
    one_shot = {k: v.tolist() for k, v in trainer.plan(0.5, method="opd").keep.items()}
    rounds = trainer.prune(0.5, method="damage-exact", rounds=2, compensate=True, calibration_batches=2)
    kept = {k: v.tolist() for k, v in rounds.keep.items()}
    with open(os.path.join(a.out, f"rank{rank()}.json"), "w") as f:
        json.dump({"rank": rank(), "one_shot": one_shot, "rounds": kept}, f)
    if is_main_process():
        model = trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.save({"priors": priors, "one_shot": one_shot, "rounds": kept, "logits": logits,
                    "train_s": train_s, "history": trainer.marglik_history}, os.path.join(a.out, "result.pt"))
    shutdown()  # leave the process group before exit (an alive Gloo group can abort the process at exit)


if __name__ == "__main__":
    main()
