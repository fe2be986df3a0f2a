"""The jobs' shared pieces on their own: model resolution, output-dir checks, run files, reporting."""

import dataclasses
import json
import os

import pytest

from spam_hf.arguments import DataArguments, ModelArguments
from spam_hf.training_arguments import SpamTrainingArguments
from spam_hf.jobs.finish import plain_args
from spam_hf.export.folders import check_output_dir, staged_folder
from spam_hf.jobs.outputs import RUN_CONFIG, check_reprune_output, write_run_config
from spam_hf.jobs.reporting import data_description, fmt_flops, fmt_int, print_table
from spam_hf.jobs.resolve import ALIASES, display_name, resolve_model

from conftest import write_tsv


def test_resolution_local_alias_and_offline(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'google-bert/bert-base-uncased' is not in the local Hugging Face cache"):
        resolve_model("bert-base")  # the alias resolves first, then fails at once offline
    assert ALIASES["bert-base"] == "google-bert/bert-base-uncased"
    assert display_name(ModelArguments("bert-base"), "/x") == "google-bert/bert-base-uncased"
    assert display_name(ModelArguments(None), "/x") == "sentence-transformers/all-MiniLM-L6-v2"
    assert display_name(ModelArguments(str(tmp_path)), str(tmp_path)) == str(tmp_path)


def test_output_dir_checks(tmp_path):
    check_output_dir(str(tmp_path / "new" / "deeper"), overwrite=False)  # may be created
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass --overwrite-output-dir"):
        check_output_dir(str(busy), overwrite=False)
    check_output_dir(str(busy), overwrite=True)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(str(busy / "f"), overwrite=True)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    for target in (run, run.parent, tmp_path):
        with pytest.raises(ValueError, match="holds the run"):
            check_reprune_output(str(run), str(target), overwrite=True)
    check_reprune_output(str(run), str(run / "pruned-0.5"), overwrite=False)
    assert os.listdir(busy) == ["f"]


def test_run_config_holds_every_argument(tmp_path):
    train = write_tsv(tmp_path / "t.tsv", 4, 0)
    data = DataArguments(train_file=train, max_seq_length=32)
    targs = SpamTrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], prior="layer", temperature=0.5)
    from spam_hf.arguments import CompressArguments, LoraArguments

    from spam_hf.pruning import PruningConfig

    write_run_config(str(tmp_path), ModelArguments("m"), data, PruningConfig(sparsity=0.7, flops_seq_len=64),
                     CompressArguments(recovery_steps=5), targs, "/m", "cmd", LoraArguments(lora_r=4))
    cfg = json.load(open(tmp_path / RUN_CONFIG))
    assert cfg["data"]["train_file"] == train and cfg["lora"]["lora_r"] == 4
    assert (cfg["compress"]["sparsity"], cfg["compress"]["flops_seq_len"], cfg["compress"]["recovery_steps"]) == \
        (0.7, 64, 5)
    assert cfg["training"]["prior"] == "layer" and cfg["training"]["temperature"] == 0.5
    assert DataArguments(**cfg["data"]) == data


def test_run_config_stores_absolute_local_paths(tmp_path, monkeypatch):
    """A run made with relative paths can be re-pruned from another working directory."""
    from spam_hf.arguments import CompressArguments
    from spam_hf.pruning import PruningConfig

    write_tsv(tmp_path / "t.tsv", 4, 0)
    os.makedirs(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    data = DataArguments(train_file="t.tsv", validation_file="t.tsv", max_seq_length=32)
    targs = SpamTrainingArguments(output_dir="o", report_to=[])
    os.makedirs("o")
    write_run_config("o", ModelArguments("model"), data, PruningConfig(), CompressArguments(), targs, "model", "cmd")
    monkeypatch.chdir("/")
    cfg = json.load(open(tmp_path / "o" / RUN_CONFIG))
    assert cfg["data"]["train_file"] == cfg["data"]["validation_file"] == str(tmp_path / "t.tsv")
    assert cfg["resolved_model"] == str(tmp_path / "model")
    assert os.path.exists(cfg["data"]["train_file"])


def test_plain_args_drop_the_spam_fields(tmp_path):
    targs = SpamTrainingArguments(output_dir=str(tmp_path), report_to=[], learning_rate=3e-4, prior="scalar")
    plain = plain_args(targs)
    assert plain["learning_rate"] == 3e-4 and "prior" not in plain and "marglik_frequency" not in plain


def test_reporting_helpers(capsys, tmp_path):
    text = print_table([("", "dense", "pruned"), ("parameters", "1,000", "500")])
    assert capsys.readouterr().out == text + "\n" and text.splitlines()[1] == "parameters  1,000  500"
    assert fmt_int(22_700_000) == "22.70M" and fmt_int(83_000) == "83,000" and fmt_flops(2.5e9) == "2.50 GFLOP"
    assert data_description(DataArguments())[0] == "packaged SST-2 sample (2,000 GLUE train rows)"
    assert data_description(DataArguments(task="sst2")) == ("nyu-mll/glue/sst2 [train]", "nyu-mll/glue/sst2 [validation]")


def test_an_interrupted_export_leaves_the_old_one_and_no_partial_folder(tmp_path):
    final = tmp_path / "run" / "model"
    os.makedirs(final)
    (final / "model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(str(final)) as stage:
            assert os.path.dirname(stage) == str(tmp_path / "run") and os.path.basename(stage).startswith(".model.partial-")
            open(os.path.join(stage, "model.safetensors"), "w").write("half")
            raise KeyboardInterrupt
    assert (final / "model.safetensors").read_text() == "old"
    assert os.listdir(tmp_path / "run") == ["model"]
    with staged_folder(str(final)) as stage:
        os.makedirs(os.path.join(stage, "base"))
        json.dump({"base_model_name_or_path": os.path.join(stage, "base")}, open(os.path.join(stage, "config.json"), "w"))
        assert not (final / "config.json").exists()  # nothing visible until the block ends
    assert sorted(os.listdir(final)) == ["base", "config.json"] and os.listdir(tmp_path / "run") == ["model"]
    # a path that named the staging folder (a LoRA adapter's pruned base) names the final one
    assert json.load(open(final / "config.json"))["base_model_name_or_path"] == str(final / "base")
    assert oct(os.stat(final).st_mode & 0o777) == oct(0o755)
    with staged_folder(None) as nothing:
        assert nothing is None


def test_the_pruning_options_parse_into_the_engines_config():
    """compress and prune parse their pruning options into the PruningConfig the engine takes (one object, not a
    CLI copy of it): every option under its own name, --sequential left to the job (None), and the same defaults
    and one-line refusals as in Python."""
    from spam_hf.cli import compress_parser, parse_compress
    from spam_hf.pruning import PruningConfig

    argv = ["--sparsity", "0.7", "--budget", "flops", "--flops-seq-len", "64", "--min-keep", "0.1",
            "--calibration-batches", "3", "--prune-seed", "5", "--compensation", "posterior", "--seed", "7"]
    _, _, config, args, _, train_args = parse_compress(argv)
    assert config == PruningConfig(sparsity=0.7, budget="flops", flops_seq_len=64, min_keep=0.1,
                                   calibration_batches=3, prune_seed=5, compensation="posterior")
    assert config.sequential is None and train_args.seed == 7  # --seed stays the run's, --prune-seed the baseline's
    assert (config.resolved(False).method, config.resolved(False).rounds) == ("damage-obs", 4)
    assert (config.resolved(True).method, config.resolved(True).rounds) == ("opd", 1)
    assert parse_compress([])[2] == dataclasses.replace(PruningConfig(), flops_seq_len=64)  # the demo's default
    assert parse_compress(["--uniform"])[2].uniform and not parse_compress([])[2].uniform  # a bare flag
    pruning = [d for d in compress_parser().dataclass_types if d is PruningConfig]
    assert len(pruning) == 1
    with pytest.raises(ValueError, match="min_keep must be in"):
        parse_compress(["--min-keep", "1.0"])


def test_automatic_schedule_defaults(tmp_path):
    """compress prunes during training by default for LoRA ranks only (a full model is pruned after training, at
    every sparsity); an explicit --schedule_sparsity wins, and plain / no training has no schedule."""
    from spam_hf.arguments import CompressArguments
    from spam_hf.jobs.policy import resolve_schedule

    t = SpamTrainingArguments(output_dir=str(tmp_path))
    job, plain = CompressArguments(), CompressArguments(training="plain")
    assert resolve_schedule(job, 0.9, t, lora=False) is None
    assert resolve_schedule(job, 0.7, t, lora=False) is None
    assert resolve_schedule(job, 0.5, t, lora=True) == 0.5
    assert resolve_schedule(plain, 0.9, t, lora=True) is None
    off = SpamTrainingArguments(output_dir=str(tmp_path), schedule_sparsity=0)
    assert resolve_schedule(job, 0.9, off, lora=True) == 0
    other = SpamTrainingArguments(output_dir=str(tmp_path), schedule_sparsity=0.6)
    assert resolve_schedule(job, 0.5, other, lora=False) == 0.6


def test_recovery_lr_scales_the_training_rate_by_sparsity():
    """--recovery-lr defaults to RECOVERY_LR_SCALES[0] x the training rate below HIGH_SPARSITY and
    RECOVERY_LR_SCALES[1] x from it, for full models and LoRA alike; an explicit value wins; <= 0 is refused."""
    from spam_hf.arguments import FinishArguments
    from spam_hf.jobs.policy import HIGH_SPARSITY, RECOVERY_LR_SCALES, resolve_recovery_lr

    low, high = RECOVERY_LR_SCALES
    assert resolve_recovery_lr(FinishArguments(), 0.5, 1e-4) == pytest.approx(low * 1e-4)
    assert resolve_recovery_lr(FinishArguments(), 0.79, 2e-5) == pytest.approx(low * 2e-5)
    assert resolve_recovery_lr(FinishArguments(), HIGH_SPARSITY, 1e-4) == pytest.approx(high * 1e-4)
    assert resolve_recovery_lr(FinishArguments(recovery_lr=3e-5), 0.9, 1e-4) == 3e-5
    with pytest.raises(ValueError, match="recovery_lr"):
        FinishArguments(recovery_lr=0.0)


def test_min_keep_defaults_to_no_floor_and_is_validated():
    """--min-keep is 0 (no per-layer floor) unless given: with damage-obs a floor costs accuracy at 90% (README
    "Damage after compensation"); values outside [0, 1) are refused."""
    from spam_hf.pruning import PruningConfig

    assert PruningConfig(sparsity=0.9).min_keep == 0.0
    assert PruningConfig(sparsity=0.9, min_keep=0.05).min_keep == 0.05
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_keep must be in"):
            PruningConfig(min_keep=bad)


def test_block_by_block_is_chosen_only_when_all_at_once_would_not_fit(monkeypatch):
    """--sequential left to the default: all at once where the predicted statistics fit in 80% of the available
    memory, block by block where they do not; never for a score or compensation it cannot take."""
    import spam_hf.jobs.finish as finish
    from spam_hf.pruning import PruningConfig

    from conftest import tiny_causal_lm

    model = tiny_causal_lm("llama")
    config = PruningConfig(sparsity=0.5).resolved(False)
    monkeypatch.setattr(finish, "available_bytes", lambda device: 2 ** 40)
    assert finish.choose_sequential(model, config, 4, 32).sequential is False
    monkeypatch.setattr(finish, "available_bytes", lambda device: 1024)
    chosen = finish.choose_sequential(model, config, 4, 32)
    assert chosen.sequential and chosen.rounds == 1 and chosen.method == "damage-obs"
    for kept in (PruningConfig(sparsity=0.5, method="damage-exact").resolved(False),
                 PruningConfig(sparsity=0.5, compensation="posterior").resolved(False)):
        assert finish.choose_sequential(model, kept, 4, 32).sequential is False
    assert finish.choose_sequential(model, config.replace(sequential=False), 4, 32).sequential is False  # given


def test_a_new_classification_head_is_one_line_not_a_load_table(tmp_path, caplog, capsys):
    """A pretrained body without a head (the usual start) says so in one line; transformers' LOAD REPORT table
    is left out, and label names reach the config."""
    import logging

    from transformers import BertModel

    from conftest import tiny_config
    from spam_hf.jobs.loading import load_classifier

    BertModel(tiny_config("bert")).save_pretrained(tmp_path / "body")
    with caplog.at_level(logging.INFO):
        model = load_classifier(str(tmp_path / "body"), 2, ["negative", "positive"])
    lines = [r.getMessage() for r in caplog.records]
    assert "new classification head (classifier.bias, classifier.weight): trained by this job" in lines
    assert not any("LOAD REPORT" in line for line in lines) and "LOAD REPORT" not in capsys.readouterr().err
    assert model.config.id2label == {0: "negative", 1: "positive"}
