"""The spam-hf CLI end to end on a tiny local model, and its bad-input contract (exit 2, one line, nothing written)."""

import json
import os
import re
import shutil

import pytest
import torch

from spam_hf.cli import main

from conftest import FAST, direct_accuracy, tiny_classifier, tiny_tokenizer, write_tsv



@pytest.mark.slow
def test_compress_prune_evaluate_end_to_end(tiny_setup, capsys, monkeypatch):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "run")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
               "--output-dir", out, "--recovery-steps", "2", *FAST])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["selection"]["sparsity_achieved"] >= 0.5
    assert report["pruned"]["block_params"] <= 0.5 * report["dense"]["block_params"] + 1
    for f in ("run_config.json", "pruning.png", "dense/spam_prior.safetensors", "dense/spam_curvature.safetensors",
              "model/config.json", "model/model.safetensors", "model/README.md"):
        assert os.path.exists(os.path.join(out, f)), f
    assert not [f for f in os.listdir(out) if ".partial-" in f]  # the export was renamed into place
    captured = capsys.readouterr()
    text = captured.out
    assert "block parameters" in text and "accuracy" in text
    # one line per stage and round; a new head in one line, not transformers' load table; no pin_memory warning
    assert "LOAD REPORT" not in captured.err and "pin_memory" not in captured.err
    assert "round 1 of 2: damage-obs removes" in captured.err and "recovery: 2 steps at learning rate" in captured.err
    assert "prior fits are logged as log_marglik" in captured.err
    assert not os.path.exists(os.path.join(out, "recovery"))  # the recovery Trainer's empty folder is removed
    card = open(os.path.join(out, "model", "README.md")).read()
    assert "spam-hf compress" in card and "50%" in card
    # the card: titled with the model, an absolute loading path (works from any folder), the environment
    assert re.search(r"\n# tiny-bert, 5\d% of its block parameters removed\n", card)
    assert f'from_pretrained("{os.path.abspath(os.path.join(out, "model"))}"' in card
    assert "transformers " in card and "torch " in card and "spam-hf 0.1.0" in card
    # re-prune the finished run at another sparsity, without retraining
    rc = main(["prune", out, "--sparsity", "0.8", "--flops-seq-len", "16", "--measure-latency", "True",
               "--recovery-steps", "2", "--distill", "0.5"])
    assert rc == 0
    rep2 = json.load(open(os.path.join(out, "pruned-0.8", "pruning_report.json")))
    assert rep2["selection"]["sparsity_achieved"] >= 0.8
    assert rep2["recovery"]["distill"] == 0.5 and rep2["recovery"]["steps"] == 2
    assert rep2["min_keep"] == 0.0  # no per-layer floor by default
    # the recovery rate by default: half the training rate at 50%, twice it from 80% (resolve_recovery_lr)
    assert rep2["recovery"]["lr"] == pytest.approx(4 * report["recovery"]["lr"])
    lat = rep2["latency"]  # dense and pruned timed interleaved, with the spread of the speed-up
    assert lat["repeats"] == 7 and lat["speedup_q25"] <= lat["speedup"] <= lat["speedup_q75"]
    assert rep2["dense"]["latency_s"] == lat["dense_s"] and rep2["pruned"]["latency_s"] == lat["pruned_s"]
    assert "interleaved runs" in open(os.path.join(out, "pruned-0.8", "model", "README.md")).read()
    # a re-prune never deletes what it did not write: not the run itself, not a non-empty folder
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("pruning_report.json", "model/model.safetensors")}
    for target, message in ((out, "holds the run"), (os.path.dirname(out), "holds the run"),
                            (os.path.join(out, "pruned-0.8"), "not empty; pass --overwrite-output-dir")):
        capsys.readouterr()
        rc = main(["prune", out, "--sparsity", "0.6", "--output-dir", target, "--measure-latency", "False"])
        assert rc == 2 and message in capsys.readouterr().err
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    assert json.load(open(os.path.join(out, "pruned-0.8", "pruning_report.json"))) == rep2
    for f in ("spam_prior.safetensors", "spam_curvature.safetensors", "spam_hyper.safetensors"):
        broken = tmp / f"broken-{f}"  # a truncated posterior file: exit 2, and nothing that blocks the retry
        shutil.copytree(out, broken)
        good = (broken / "dense" / f).read_bytes()
        (broken / "dense" / f).write_bytes(good[:50])
        assert main(["prune", str(broken), "--sparsity", "0.6", "--measure-latency", "False"]) == 2
        assert "Traceback" not in capsys.readouterr().err
        assert not (broken / "pruned-0.6").exists()  # it used to keep pruned-0.6/trainer_tmp: "not empty"
        (broken / "dense" / f).write_bytes(good)
        assert main(["prune", str(broken), "--sparsity", "0.6", "--measure-latency", "False"]) == 0
    assert main(["prune", out, "--sparsity", "0.999", "--output-dir", str(tmp / "p999")]) == 2
    assert "would remove every head and neuron" in capsys.readouterr().err and not (tmp / "p999").exists()
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "model").mkdir()
    (busy / "model" / "mine.txt").write_text("x")
    assert main(["prune", out, "--sparsity", "0.6", "--output-dir", str(busy), "--measure-latency", "False"]) == 2
    assert (busy / "model" / "mine.txt").read_text() == "x"
    # the disk fills up while the export is written: exit 2 with the system's one line, no model, no partial folder
    import errno

    import spam_hf.jobs.finish as finish

    def full_disk(model, directory, **kw):
        open(os.path.join(directory, "model.safetensors"), "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finish, "save_pruned", full_disk)
    capsys.readouterr()
    assert main(["prune", out, "--sparsity", "0.6", "--output-dir", str(tmp / "full"), "--measure-latency", "False"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not (tmp / "full").exists()  # the folder this prune created is gone: no model, no partial, no scratch
    monkeypatch.undo()
    # evaluate any checkpoint: its numbers against a direct computation on the reloaded model
    from transformers import AutoTokenizer

    from spam_hf.export import from_pretrained

    pruned_dir = os.path.join(out, "pruned-0.8", "model")
    m = from_pretrained(pruned_dir)
    acc = direct_accuracy(m, AutoTokenizer.from_pretrained(pruned_dir), dev, 16)
    assert rep2["pruned"]["accuracy"] == pytest.approx(acc, abs=1e-9)  # prune's report: the same model
    capsys.readouterr()
    rc = main(["evaluate", pruned_dir, "--train-file", train, "--validation-file", dev,
               "--max_seq_length", "16", "--seq-len", "16", "--batch-size", "2"])
    assert rc == 0
    rows = {line.split("  ")[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines() if "  " in line}
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params < sum(p.numel() for p in tiny_classifier("bert", num_labels=2).parameters())
    assert rows["accuracy"] == f"{acc:.4f}" and rows["parameters"] == f"{n_params:,}"
    assert not os.path.exists(os.path.join(pruned_dir, ".eval_tmp"))  # evaluate writes nothing into the checkpoint


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "0.999"], "sparsity 0.999 would remove every head and neuron: at most 9"),
    (["--uniform", "--sparsity", "0.6"], "out of reach of --uniform here: it removes only neurons"),
    (["--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["--sparsity", "0"], "sparsity must be in (0, 1)"),
    (["--label-column", "lable"], "no label column 'lable'; available columns: sentence, label"),
    (["--text-column", "text"], "no text column 'text'; available columns: sentence, label"),
    (["--prior", "group"], "argument --prior: invalid choice: 'group'"),
    (["--method", "taylor"], "argument --method: invalid choice: 'taylor'"),
    (["--lora-merge", "True"], "--lora-merge needs --lora-r"),
    (["--fsdp2"], "this job runs in one: launch it with torchrun"),
    (["--fsdp2", "--lora-r", "4"], "--fsdp2 with LoRA (--lora-r) is not supported"),
    (["--fsdp2", "--device-map", "auto"], "--fsdp2 shards the model over processes and --device-map"),
    (["--push-to-hub", "user/x"], "the Hub cannot be reached now"),  # offline (conftest): before training
    (["--distill", "0.5"], "give --recovery-steps or --recovery-epochs too"),
    (["--recovery-steps", "2", "--distill-teacher", "x"], "give --distill"),
    (["--recovery-steps", "2", "--distill", "0.5", "--distill-teacher", "no/such/folder"], "is not a folder"),
    # pruning during training leaves no unmasked model to distil from: refused before training
    (["--sparsity", "0.8", "--schedule_sparsity", "0.8", "--recovery-steps", "2", "--distill", "0.5"],
     "cannot teach: give --distill-teacher"),
])
def test_bad_input_exits_2_without_writing(tiny_setup, capsys, extra, message):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "run")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--output-dir", out, *FAST, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_distillation_after_pruning_during_training_takes_an_unmasked_teacher(tiny_setup, capsys):
    """A run pruned during training has a masked dense/: `prune --distill` refuses it (exit 2, nothing written)
    and takes an unmasked model with --distill-teacher instead, which must predict the same labels."""
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "sched")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
               "--schedule_sparsity", "0.5", "--output-dir", out, *FAST])
    assert rc == 0
    capsys.readouterr()
    rc = main(["prune", out, "--sparsity", "0.5", "--recovery-steps", "2", "--distill", "0.5",
               "--output-dir", str(tmp / "self"), "--measure-latency", "False"])
    assert rc == 2 and "cannot teach" in capsys.readouterr().err and not os.path.exists(tmp / "self")
    three = str(tmp / "three-labels")
    tiny_classifier("bert", num_labels=3).save_pretrained(three)
    rc = main(["prune", out, "--sparsity", "0.5", "--recovery-steps", "2", "--distill", "0.5",
               "--distill-teacher", three, "--output-dir", str(tmp / "wrong"), "--measure-latency", "False"])
    assert rc == 2 and "with 3 labels" in capsys.readouterr().err and not os.path.exists(tmp / "wrong")
    rc = main(["prune", out, "--sparsity", "0.5", "--recovery-steps", "2", "--distill", "0.5",
               "--distill-teacher", model_dir, "--output-dir", str(tmp / "taught"), "--measure-latency", "False"])
    assert rc == 0
    rep = json.load(open(tmp / "taught" / "pruning_report.json"))
    assert rep["recovery"]["distill_teacher"] == model_dir and rep["recovery"]["steps"] == 2
    assert rep["min_keep"] == 0.0  # pruned during training: no floor over the groups masked in training
    assert "accuracy_before_recovery" in rep["pruned"]


def test_empty_dataset_and_labels_out_of_range(tiny_setup, capsys):
    model_dir, train, dev, tmp = tiny_setup
    empty = tmp / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", str(empty), "--output-dir",
               str(tmp / "r1"), *FAST])
    assert rc == 2 and "empty" in capsys.readouterr().err
    bad_dev = write_tsv(tmp / "bad_dev.tsv", 6, 2, labels=(0, 5))
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", bad_dev, "--output-dir",
               str(tmp / "r2"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "labels out of range: [5]" in err
    assert not os.path.exists(tmp / "r1") and not os.path.exists(tmp / "r2")


def test_unsupported_architecture_and_uncached_hub_model(tmp_path, capsys):
    from transformers import BloomConfig, BloomForSequenceClassification

    d = str(tmp_path / "bloom")
    BloomForSequenceClassification(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(d)
    rc = main(["compress", d, "--train-file", write_tsv(tmp_path / "t.tsv", 8, 0), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown model_type 'bloom'; supported: bert" in err
    rc = main(["compress", "someone/not-cached-model", "--train-file", str(tmp_path / "t.tsv"),
               "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not in the local Hugging Face cache and the Hub is offline" in err


@pytest.mark.slow
def test_compress_is_reproducible_with_a_new_head(tmp_path):
    """A checkpoint whose head does not fit the data (3 labels, data with 2) gets a new head: seeded, so two
    runs of the same command give the same model and the same pruning decision."""
    model_dir = str(tmp_path / "three-labels")
    tiny_classifier("bert", num_labels=3).save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    train, dev = write_tsv(tmp_path / "t.tsv", 32, 0), write_tsv(tmp_path / "d.tsv", 8, 1)
    reports = []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                     "--output-dir", out, *FAST]) == 0
        reports.append(json.load(open(os.path.join(out, "pruning_report.json"))))
    assert reports[0]["selection"]["keep"] == reports[1]["selection"]["keep"]
    assert reports[0]["pruned"]["accuracy"] == reports[1]["pruned"]["accuracy"]


def test_output_dir_not_empty_needs_overwrite(tiny_setup, capsys):
    model_dir, train, dev, tmp = tiny_setup
    out = tmp / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["compress", model_dir, "--train-file", train, "--output-dir", str(out), *FAST])
    assert rc == 2 and "not empty; pass --overwrite-output-dir" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_output_dir_not_writable(tiny_setup, capsys):
    model_dir, train, dev, tmp = tiny_setup
    blocker = tmp / "a_file"
    blocker.write_text("x")
    rc = main(["compress", model_dir, "--train-file", train, "--output-dir", str(blocker / "out"), *FAST])
    assert rc == 2 and "cannot be created" in capsys.readouterr().err
    if os.path.isdir("/proc"):  # Linux: no one, root included, can create folders in /proc
        rc = main(["compress", model_dir, "--train-file", train, "--output-dir", "/proc/spam-hf-test-out", *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and "not writable" in err


def test_nan_loss_exits_2_with_step(tiny_setup, capsys):
    model_dir, train, dev, tmp = tiny_setup
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--output-dir",
               str(tmp / "nan"), *FAST, "--learning_rate", "1e30", "--num_train_epochs", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite training loss" in err and "at step" in err


def test_help_and_unknown_command(capsys):
    assert main(["compress", "--help"]) == 0
    assert "--sparsity" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


def _shipped_recipe(tmp_path, name="minilm-sst2.yaml"):
    """A shipped recipe with its ../shared data paths pointed at small files that exist here."""
    text = open(os.path.join(RECIPES, name)).read()
    train, dev = write_tsv(tmp_path / "t.tsv", 16, 0), write_tsv(tmp_path / "d.tsv", 8, 1)
    for f in ("train.tsv", "train_12k_seed0.tsv"):
        text = text.replace(f"../shared/data/sst2/{f}", train)
    text = text.replace("../shared/data/sst2/dev.tsv", dev)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_recipe_is_typed_parser_defaults_and_flags_win(tmp_path):
    """recipes/*.yaml hold the CLI's own fields as typed defaults: the shipped recipe parses to its values,
    a flag after it wins, and the offline demo's defaults do not leak in when the recipe names a model."""
    from spam_hf.cli import DEMO_DEFAULTS, parse_compress

    recipe = _shipped_recipe(tmp_path)
    m, d, p, c, lora, t = parse_compress(["--recipe", recipe, "--sparsity", "0.8"])
    assert m.model_name_or_path == "minilm" and d.train_file.endswith("t.tsv")
    assert p.sparsity == 0.8 and c.recovery_steps == 200 and c.recovery_lr == 5e-5
    assert t.prior == "unit" and t.marglik_frequency == 200 and t.n_hypersteps == 30
    assert t.learning_rate == 1e-4 and t.num_train_epochs == 2 and t.output_dir == "runs/minilm-sst2-60"
    assert d.max_seq_length == 64 and lora.lora_r == 0
    assert c.recovery_steps != DEMO_DEFAULTS["recovery_steps"]
    # without a recipe or model, the demo's defaults; a flag still wins over them
    m, d, p, c, lora, t = parse_compress(["--sparsity", "0.7"])
    assert p.sparsity == 0.7 and c.recovery_steps == DEMO_DEFAULTS["recovery_steps"]
    assert t.marglik_frequency == DEMO_DEFAULTS["marglik_frequency"] and t.output_dir == os.path.join("runs", "spam-demo")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(f for f in os.listdir(RECIPES) if f.endswith(".yaml")))
def test_every_shipped_recipe_parses_and_dry_runs(tiny_setup, name, capsys):
    """Each recipe behind a published number runs end to end: its own settings, with the model, data and
    length swapped for tiny ones and two training steps."""
    model_dir, train, dev, tmp = tiny_setup
    recipe = _shipped_recipe(tmp, name)
    out = str(tmp / "out")
    rc = main(["compress", model_dir, "--recipe", recipe, "--output-dir", out, "--max_steps", "2",
               "--max_seq_length", "16", "--flops-seq-len", "16", "--measure-latency", "False", "--use_cpu", "True",
               "--recovery-steps", "1"])
    assert rc == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "model", "config.json"))


@pytest.mark.parametrize("content,message", [
    ("learning_rat: 0.1\n", "unknown option 'learning_rat'; valid options: "),
    ("a: [1\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("prior: group\n", "prior must be one of scalar, layer, unit, parameter"),
])
def test_bad_recipes_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    assert main(["compress", "--recipe", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert main(["compress", "--recipe", str(tmp_path)]) == 2  # a directory
    assert "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_allowed_values_are_argparse_choices(capsys):
    """--help lists the allowed values, and argparse refuses others before any work."""
    assert main(["compress", "--help"]) == 0
    out = capsys.readouterr().out
    assert "{auto,damage,damage-exact,damage-obs,damage-out,fisher,flap,magnitude,opd,random,wanda-sp}" in out
    assert "{scalar,layer,unit,parameter}" in out
    assert "{least-squares,posterior,bias,reference}" in out
    assert "{spam,plain,none}" in out and "{params,flops}" in out
    assert main(["compress", "--method", "taylor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'taylor'" in err and "--help lists the options" in err


def test_help_is_fast_lists_every_option_and_puts_the_common_ones_first():
    """``--help`` of every command prints without importing torch or transformers, shows the common options
    before the rest, and names every option the command's parser accepts (the Trainer's behind --help-all)."""
    import dataclasses
    import subprocess
    import sys

    from spam_hf.cli import COMMON, SUBCOMMANDS, command_sections, compress_sections

    assert [c for c, _ in command_sections()] == list(SUBCOMMANDS)
    code = ("import sys; from spam_hf.cli import main, SUBCOMMANDS; [main([c, '--help']) for c in SUBCOMMANDS];"
            "main(['--help']); print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "False False", proc.stderr
    for command, sections in command_sections():
        text = proc.stdout.split(f"usage: spam-hf {command}")[1].split("usage: ")[0]
        for _, dtype in sections:
            for f in dataclasses.fields(dtype):
                name = "--push-to-hub" if f.name == "push_to_hub_repo" else \
                    ("[MODEL]" if f.name == "model_name_or_path" else "--" + f.name.replace("_", "-"))
                assert f"  {name}" in text, (command, name)
    compress_help = proc.stdout.split("usage: spam-hf compress")[1]
    assert compress_help.index("common options:") < compress_help.index("--sparsity") < \
        compress_help.index("pruning options:") < compress_help.index("  --budget {")
    assert "--help-all" in compress_help
    assert len(COMMON) == len(set(COMMON))
    # the parser behind the sectioned help takes exactly the sections' options, plus TrainingArguments
    from spam_hf.cli import compress_parser

    parsed = {a.dest for a in compress_parser()._actions} - {"help"}
    shown = {f.name for _, dtype in compress_sections(full=True) for f in dataclasses.fields(dtype)}
    assert parsed == shown


def test_help_all_lists_the_trainer_options(capsys):
    assert main(["compress", "--help-all"]) == 0
    out = capsys.readouterr().out
    assert "--gradient_accumulation_steps" in out and "--kfac_diagonal_from" in out


@pytest.mark.slow
def test_plain_training_then_posthoc_priors(tiny_setup):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "plain")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.4",
               "--output-dir", out, "--training", "plain", "--posthoc_batches", "2", "--method", "opd", *FAST])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["method"] == "opd" and report["selection"]["sparsity_achieved"] >= 0.4


@pytest.mark.slow
@pytest.mark.parametrize("model_type,extra", [("llama", []), ("llama", ["--kv-groups-only", "True"]), ("gpt2", [])])
def test_causal_lm_compress_end_to_end(tiny_lm_setup, model_type, extra):
    """Text files -> packed blocks -> SpamTrainer (token-level curvature) -> prune -> perplexity -> export."""
    model_dir, train, valid, tmp = tiny_lm_setup(model_type)
    out = str(tmp / "run")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", valid, "--sparsity", "0.5",
               "--output-dir", out, *FAST, *extra])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["metric"] == "perplexity"
    layer = report["selection"]["layers"][0]
    if model_type == "llama":  # GQA: 4 query heads on 2 KV heads, or 2 whole KV groups
        assert (layer["heads_total"], layer["kv_heads_total"]) == ((2, 0) if extra else (4, 2))
    assert 1.0 < report["dense"]["perplexity"] < 100 and report["pruned"]["perplexity"] > 1.0
    assert report["selection"]["sparsity_achieved"] >= 0.5
    state = json.load(open(os.path.join(out, "dense", "spam_state.json")))
    assert state["likelihood"] == "causal_lm" and state["kfac_reduction"] == "expand"
    from spam_hf.export import from_pretrained

    m = from_pretrained(os.path.join(out, "model")).eval()
    assert type(m).__name__.endswith("ForCausalLM") or type(m).__name__.endswith("LMHeadModel")
    import torch

    ids = torch.tensor([[5, 20, 21, 22]])
    assert m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_dry_run_predicts_every_stage_from_the_config_and_writes_nothing(tiny_lm_setup, capsys):
    """`compress --dry-run` reads the config alone: the groups per layer, one line per stage, and a last line
    scripts can read; the output folder is not created."""
    import re

    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    out = tmp / "never"
    for extra in ([], ["--sequential", "True", "--training", "none"]):
        capsys.readouterr()
        assert main(["compress", model_dir, "--train-file", train, "--dry-run", "True", "--output-dir", str(out),
                     *extra]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert re.fullmatch(r"peak memory: \d+\.\d GiB", lines[-1]), lines[-1]
        assert any("prunable groups per layer: 4 heads, 2 kv heads, 48 neurons" in x for x in lines)
        assert any(x.strip().startswith("statistics") for x in lines)
        assert any(x.strip().startswith("training") for x in lines) == (not extra)
        assert not out.exists()


@pytest.mark.slow
def test_post_hoc_block_sequential_compress(tiny_lm_setup, capsys):
    """The large-model path end to end: `--training none --sequential True` prunes a decoder one block at a time
    and exports it; a score that needs every module at once is refused before any work."""
    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    out = str(tmp / "seq")
    common = ["compress", model_dir, "--train-file", train, "--validation-file", valid, "--training", "none",
              "--sequential", "True", "--calibration-batches", "2", *FAST]
    assert main(common + ["--sparsity", "0.3", "--output-dir", out]) == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["sequential"] and report["method"] == "damage-obs" and report["rounds"] == 1
    assert report["selection"]["sparsity_achieved"] >= 0.3 and report["pruned"]["perplexity"] > 1.0
    # re-pruned from the saved run, block by block again, at another sparsity
    assert main(["prune", out, "--sparsity", "0.5", "--sequential", "True", "--calibration-batches", "2",
                 "--measure-latency", "False"]) == 0
    again = json.load(open(os.path.join(out, "pruned-0.5", "pruning_report.json")))
    assert again["sequential"] and again["selection"]["sparsity_achieved"] >= 0.5
    from spam_hf.export import from_pretrained

    assert from_pretrained(os.path.join(out, "model")) is not None
    capsys.readouterr()
    bad = str(tmp / "bad")
    assert main(common + ["--sparsity", "0.3", "--method", "damage-exact", "--output-dir", bad]) == 2
    assert "needs every module's statistics at once" in capsys.readouterr().err and not os.path.exists(bad)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "olmo2", "mixtral", "qwen3_moe"])
def test_newer_decoder_families_compress_end_to_end(tiny_lm_setup, model_type):
    """SpaM training (KFAC through fused projections and layer-wide norms), the default pruning and the export of the
    newer decoder families through the CLI; the export reloads and runs."""
    from spam_hf.export import from_pretrained

    model_dir, train, valid, tmp = tiny_lm_setup(model_type)
    out = str(tmp / "run")
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", valid, "--sparsity", "0.4",
                 "--output-dir", out, *FAST]) == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["selection"]["sparsity_achieved"] >= 0.4 and report["pruned"]["perplexity"] > 1.0
    model = from_pretrained(os.path.join(out, "model")).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 20, 21, 22]])).logits).all()


@pytest.mark.slow
def test_decoder_sequence_classification(tiny_lm_setup):
    """A decoder checkpoint with classification data: *ForSequenceClassification, padded with EOS."""
    model_dir, _, _, tmp = tiny_lm_setup("gpt2")
    train, dev = write_tsv(tmp / "train.tsv", 48, 0), write_tsv(tmp / "dev.tsv", 16, 1)
    out = str(tmp / "cls")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.3",
               "--output-dir", out, *FAST])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    cfg = json.load(open(os.path.join(out, "model", "config.json")))
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    # the reported accuracy (batched, EOS-padded) is the exported model's, one unpadded sentence at a time
    from transformers import AutoTokenizer

    from spam_hf.export import from_pretrained

    model = from_pretrained(os.path.join(out, "model"))
    acc = direct_accuracy(model, AutoTokenizer.from_pretrained(os.path.join(out, "model")), dev, 16)
    assert report["metric"] == "accuracy" and report["pruned"]["accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.slow
def test_lora_compress_prunes_ranks_and_base_and_exports_a_peft_adapter(tiny_setup):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "lora")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
               "--lora-r", "4", "--lora-target-modules", "query,value,intermediate.dense", "--lora-merge", "True",
               "--prune-base", "True", "--base-sparsity", "0.3", "--output-dir", out, "--recovery-steps", "2", *FAST])
    assert rc == 0
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["export"]["format"] == "peft_adapter"
    assert report["selection"]["sparsity_achieved"] >= 0.5
    assert report["pruned"]["block_params"] <= 0.5 * report["dense"]["block_params"] + 1  # adapter parameters
    assert report["selection"]["layers"][0]["ranks_total"] == 4
    run_config = json.load(open(os.path.join(out, "run_config.json")))
    assert run_config["training"]["schedule_sparsity"] == 0.5  # LoRA: the rank budget during training by default
    cfg = json.load(open(os.path.join(out, "model", "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"]
    assert os.path.exists(os.path.join(out, "model-merged", "model.safetensors"))
    assert report["base_selection"]["sparsity_achieved"] >= 0.3  # --prune-base: a smaller base next to the adapter
    assert json.load(open(os.path.join(out, "model", "base", "config.json")))["spam_pruning"]["linear_shapes"]
    card = open(os.path.join(out, "model", "README.md")).read()
    assert "PeftModel.from_pretrained" in card and "ranks kept" in card
    # re-prune the adapter run, and evaluate the adapter on its base
    assert main(["prune", out, "--sparsity", "0.8", "--flops-seq-len", "16", "--measure-latency", "False"]) == 0
    assert json.load(open(os.path.join(out, "pruned-0.8", "pruning_report.json")))["selection"]["sparsity_achieved"] >= 0.8
    assert main(["evaluate", os.path.join(out, "pruned-0.8", "model"), "--train-file", train, "--validation-file",
                 dev, "--max_seq_length", "16", "--seq-len", "16", "--batch-size", "2"]) == 0


def test_lora_unknown_target_module_is_a_clear_error(tiny_setup, capsys):
    model_dir, train, dev, tmp = tiny_setup
    out = tmp / "bad-lora"
    rc = main(["compress", model_dir, "--train-file", train, "--output-dir", str(out), "--lora-r", "4",
               "--lora-target-modules", "qkv_proj", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("spam-hf: error: LoRA:") and "qkv_proj" in err[-1]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_causal_lm_with_lora(tiny_lm_setup):
    model_dir, train, valid, tmp = tiny_lm_setup("llama")
    out = str(tmp / "lm-lora")
    rc = main(["compress", model_dir, "--train-file", train, "--validation-file", valid, "--sparsity", "0.5",
               "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj,down_proj", "--prune-base", "True",
               "--base-sparsity", "0.3", "--output-dir", out, "--schedule_sparsity", "0", *FAST])
    assert rc == 0
    assert json.load(open(os.path.join(out, "run_config.json")))["training"]["schedule_sparsity"] == 0  # off
    report = json.load(open(os.path.join(out, "pruning_report.json")))
    assert report["metric"] == "perplexity" and report["export"]["format"] == "peft_adapter"
    base_layers = report["base_selection"]["layers"]  # GQA base: whole KV groups (peft cannot wrap gathered K/V)
    assert all(r["kv_heads_total"] == 0 and r["heads_total"] in (0, 1, 2) for r in base_layers)
    assert json.load(open(os.path.join(out, "model", "adapter_config.json")))["task_type"] == "CAUSAL_LM"


def _assert_same_run(a_dir, b_dir):
    """Two compress runs ended alike: dense weights and priors (to 1e-6), and the same groups kept."""
    from safetensors.torch import load_file

    for f in ("spam_prior.safetensors", "model.safetensors"):
        a, b = load_file(os.path.join(a_dir, "dense", f)), load_file(os.path.join(b_dir, "dense", f))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    reports = [json.load(open(os.path.join(d, "pruning_report.json"))) for d in (a_dir, b_dir)]
    assert reports[0]["selection"]["keep"] == reports[1]["selection"]["keep"]


@pytest.mark.slow
def test_cli_resume_from_checkpoint_ends_like_the_uninterrupted_run(tiny_setup, capsys):
    """`--resume_from_checkpoint` continues the run in place (no --overwrite-output-dir) from the checkpoint,
    with the SpaM state: final weights, priors and pruning decision equal the uninterrupted run's."""
    model_dir, train, dev, tmp = tiny_setup
    common = ["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5", *FAST,
              "--num_train_epochs", "2", "--save_strategy", "epoch", "--save_total_limit", "3"]
    out = str(tmp / "full")
    assert main(common + ["--output-dir", out]) == 0
    first = os.path.join(out, "checkpoint-8")
    assert os.path.exists(os.path.join(first, "spam_hyper.safetensors"))
    resumed = str(tmp / "resumed")
    shutil.copytree(out, resumed, ignore=lambda d, names: [n for n in names if d == out and (
        n in ("checkpoint-16", "dense", "model", "recovery") or n.endswith((".json", ".png")))])  # as killed after epoch 1
    assert main(common + ["--output-dir", resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-8")]) == 0
    _assert_same_run(out, resumed)
    # a checkpoint kept outside the output folder starts a new run there: a fresh folder ends like the
    # uninterrupted run; a folder with the user's files is refused and nothing in it is touched
    elsewhere = str(tmp / "elsewhere")
    assert main(common + ["--output-dir", elsewhere, "--resume_from_checkpoint", first]) == 0
    _assert_same_run(out, elsewhere)
    capsys.readouterr()
    busy = _busy_folder(tmp / "busy")
    assert main(common + ["--output-dir", str(busy), "--resume_from_checkpoint", first]) == 2
    assert "not empty; pass --overwrite-output-dir" in capsys.readouterr().err
    assert _contents(busy) == _contents(_busy_folder(tmp / "busy-copy"))
    assert main(common + ["--output-dir", str(tmp / "none"), "--resume_from_checkpoint", "last"]) == 2
    assert "no complete checkpoint-* folder" in capsys.readouterr().err
    truncated = tmp / "trunc" / "checkpoint-8"  # a truncated optimizer.pt: torch's RuntimeError, still one line
    shutil.copytree(first, truncated)
    (truncated / "optimizer.pt").write_bytes((truncated / "optimizer.pt").read_bytes()[:100])
    assert main(common + ["--output-dir", str(tmp / "trunc-out"), "--resume_from_checkpoint", str(truncated)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("spam-hf: error: ")]
    assert "Traceback" not in err and len(lines) == 1 and "--debug" in lines[0], err[-2000:]


def _run_and_kill(code, argv, marker):
    """Run ``python -c code ARGV`` and kill it with SIGKILL as soon as ``marker`` exists (it must still be running)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _busy_folder(path):
    """An output folder a user already holds an export and a run config in."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "model.safetensors").write_bytes(b"the user's export")
    (path / "run_config.json").write_text('{"mine": true}')
    return path


def _contents(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_resume_from_a_checkpoint_outside_the_output_dir_needs_overwrite(tiny_setup, capsys):
    """Resuming from a checkpoint kept elsewhere does not continue the run in --output-dir: a non-empty one is
    refused before any work, and the user's export and run config in it are left as they were (the run used
    to go ahead, delete `model/` and overwrite `run_config.json`)."""
    model_dir, train, dev, tmp = tiny_setup
    from spam_hf.trainer import mark_complete

    ckpt = tmp / "elsewhere" / "checkpoint-8"
    ckpt.mkdir(parents=True)
    mark_complete(str(ckpt), 8)
    busy = _busy_folder(tmp / "busy")
    before = _contents(busy)
    rc = main(["compress", model_dir, "--train-file", train, "--output-dir", str(busy),
               "--resume_from_checkpoint", str(ckpt), *FAST])
    assert rc == 2 and "not empty; pass --overwrite-output-dir" in capsys.readouterr().err
    assert _contents(busy) == before


@pytest.mark.slow
def test_sigkill_after_the_last_checkpoint_then_resume_is_exact(tiny_setup):
    """A real `spam-hf compress` killed with SIGKILL after training's last checkpoint (while it prunes), resumed
    with `--resume_from_checkpoint last`: no step past max_steps, and the uninterrupted run's weights, priors,
    hyper-optimiser state, curvature keys and pruning decision (it used to train one more step and take an extra
    prior update)."""
    from safetensors.torch import load_file

    model_dir, train, dev, tmp = tiny_setup
    common = ["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5", *FAST,
              "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "6"]
    out = str(tmp / "full")
    assert main(common + ["--output-dir", out]) == 0
    killed = str(tmp / "killed")
    slow_prune = ("import sys, time, spam_hf.jobs; c = sys.modules['spam_hf.jobs.compress']; f = c.prune_and_export; "
                  "c.prune_and_export = lambda *a, **k: (time.sleep(120), f(*a, **k))[1]; "
                  "from spam_hf.cli import main; sys.exit(main(sys.argv[1:]))")
    # run_config.json is written after training, just before pruning
    _run_and_kill(slow_prune, [*common, "--output-dir", killed], os.path.join(killed, "run_config.json"))
    assert os.path.exists(os.path.join(killed, "checkpoint-12")) and not os.path.exists(os.path.join(killed, "model"))
    assert main(common + ["--output-dir", killed, "--resume_from_checkpoint", "last"]) == 0
    assert not os.path.exists(os.path.join(killed, "checkpoint-13"))
    _assert_same_run(out, killed)
    for f in ("spam_hyper.safetensors", "spam_curvature.safetensors"):
        a, b = (load_file(os.path.join(d, "dense", f)) for d in (out, killed))
        assert sorted(a) == sorted(b), f
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_partial_export(tiny_setup):
    """SIGTERM (a scheduler stopping the job) while the export is written ends the job like Ctrl-C: exit 2 with one
    line, no `model/` and no hidden `.model.partial-*` folder (a default SIGTERM left the partial folder behind)."""
    import signal
    import subprocess
    import sys
    import time

    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp / "term")
    slow_export = ("import sys, time, spam_hf.jobs\n"
                   "f = sys.modules['spam_hf.jobs.finish']\n"
                   "def half(model, directory, **kw):\n"
                   "    open(directory + '/model.safetensors', 'wb').write(b'half'); time.sleep(120)\n"
                   "f.save_pruned = half\n"
                   "from spam_hf.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow_export, "compress", model_dir, "--train-file", train,
                             "--validation-file", dev, "--sparsity", "0.5", "--output-dir", out, *FAST],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300

    def partial():
        return [f for f in os.listdir(out) if ".partial-" in f] if os.path.isdir(out) else []

    while not any(os.path.exists(os.path.join(out, p, "model.safetensors")) for p in partial()) \
            and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the export"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 2
    err = proc.stderr.read()
    assert "spam-hf: error: interrupted" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "model")) and not partial()
    assert os.path.exists(os.path.join(out, "dense", "model.safetensors"))  # the trained model is kept


@pytest.mark.slow
def test_lora_resume_from_checkpoint_ends_like_the_uninterrupted_run(tiny_setup):
    """A LoRA run (rank priors, ranks masked on the schedule) resumed from its first epoch's checkpoint: the
    adapter, the priors, the schedule's masks and the pruned ranks equal the uninterrupted run's."""
    from safetensors.torch import load_file

    model_dir, train, dev, tmp = tiny_setup
    common = ["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5", *FAST,
              "--lora-r", "4", "--num_train_epochs", "2", "--save_strategy", "epoch", "--save_total_limit", "3"]
    out = str(tmp / "full")
    assert main(common + ["--output-dir", out]) == 0
    resumed = str(tmp / "resumed")
    shutil.copytree(out, resumed, ignore=lambda d, names: [n for n in names if d == out and (
        n in ("checkpoint-16", "dense", "model", "recovery") or n.endswith((".json", ".png")))])
    assert main(common + ["--output-dir", resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-8")]) == 0
    files = sorted(f for f in os.listdir(os.path.join(out, "dense")) if f.endswith(".safetensors"))
    assert "adapter_model.safetensors" in files and "spam_prior.safetensors" in files
    for f in files:
        a, b = (load_file(os.path.join(d, "dense", f)) for d in (out, resumed))
        assert sorted(a) == sorted(b), f
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    reports = [json.load(open(os.path.join(d, "pruning_report.json"))) for d in (out, resumed)]
    assert reports[0]["selection"]["keep"] == reports[1]["selection"]["keep"]


def test_corrupt_inputs_exit_2_with_one_line(tiny_setup, tmp_path, capsys):
    """The exit-2 contract for broken inputs: a directory as train file, a corrupt config.json, truncated
    weights (compress), truncated prior / curvature files (prune). Nothing is left in the output dir."""
    model_dir, train, dev, tmp = tiny_setup
    cases = []
    cases.append((["compress", model_dir, "--train-file", str(tmp_path)], "is not a file"))
    bad_cfg = tmp_path / "bad-config"
    shutil.copytree(model_dir, bad_cfg)
    (bad_cfg / "config.json").write_text("{ not json")
    cases.append((["compress", str(bad_cfg), "--train-file", train], "config"))
    bad_weights = tmp_path / "bad-weights"
    shutil.copytree(model_dir, bad_weights)
    w = bad_weights / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    cases.append((["compress", str(bad_weights), "--train-file", train], f"the weights in {bad_weights} cannot be read"))
    for argv, message in cases:
        out = tmp_path / "out"
        assert main(argv + ["--output-dir", str(out), *FAST]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("spam-hf: error: ")]
        assert len(lines) == 1 and message in lines[0], err[-2000:]
        assert not out.exists() or not os.listdir(out), argv


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_ends_like_the_uninterrupted_run(tiny_setup):
    """A real `spam-hf compress` process killed with SIGKILL after a checkpoint, resumed from the CLI with
    `--resume_from_checkpoint last`: the same weights, priors and pruning decision as the uninterrupted run."""
    model_dir, train, dev, tmp = tiny_setup
    common = ["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5", *FAST,
              "--num_train_epochs", "6", "--save_strategy", "epoch"]
    out = str(tmp / "full")
    assert main(common + ["--output-dir", out]) == 0
    killed = str(tmp / "killed")
    _run_and_kill("import sys; from spam_hf.cli import main; sys.exit(main(sys.argv[1:]))",
                  [*common, "--output-dir", killed], os.path.join(killed, "checkpoint-16", "trainer_state.json"))
    assert not os.path.exists(os.path.join(killed, "model"))
    assert main(common + ["--output-dir", killed, "--resume_from_checkpoint", "last"]) == 0
    _assert_same_run(out, killed)


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(tiny_setup, capsys, monkeypatch):
    """An exception of a type the CLI does not expect (torch's RuntimeError from a truncated optimizer.pt) is still
    one line with its type and a hint; --debug (or SPAM_HF_DEBUG=1) adds the traceback. An empty --output-dir is
    refused before any work."""
    import spam_hf.jobs as jobs

    model_dir, train, dev, tmp = tiny_setup

    def broken(*a, **kw):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    monkeypatch.setattr(jobs, "compress", broken)
    argv = ["compress", model_dir, "--train-file", train, "--output-dir", str(tmp / "x"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("spam-hf: error: RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                           "finding central directory (run with --debug for the traceback)")
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("spam-hf: error:")
    monkeypatch.setenv("SPAM_HF_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("SPAM_HF_DEBUG")
    monkeypatch.undo()
    assert main(["compress", model_dir, "--train-file", train, "--output-dir", "", *FAST]) == 2
    assert "--output-dir is empty" in capsys.readouterr().err


def test_prune_names_a_broken_run_config(tmp_path, capsys):
    """`spam-hf prune` on a run whose run_config.json is `{}` or not JSON: one line naming the file (it was a
    KeyError traceback), nothing written."""
    from spam_hf.posterior import STATE_FILE

    run = tmp_path / "run"
    (run / "dense").mkdir(parents=True)
    (run / "dense" / STATE_FILE).write_text("{}")
    for text, message in (("{}", "is not a spam-hf run config: it has no 'model'"), ("{ nope", "is not valid JSON")):
        (run / "run_config.json").write_text(text)
        assert main(["prune", str(run), "--sparsity", "0.5"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(run / "run_config.json") in err and "Traceback" not in err
        assert not (run / "pruned-0.5").exists()
