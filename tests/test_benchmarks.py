"""Tiny smoke runs of every benchmark script (the real runs are not part of the suite)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from spam_hf.cli import main

from conftest import FAST

pytestmark = pytest.mark.slow  # every test here runs a benchmark script end to end

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def run(script, *args, cwd=None):
    res = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                         cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_curvature_cost_smoke(tmp_path):
    out = str(tmp_path / "cc.json")
    run("curvature_cost.py", "--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "48",
        "--batch-size", "2", "--seq-len", "8", "--repeats", "1", "--out", out)
    r = json.load(open(out))
    assert set(r["subsample_error"]) == {"256", "512", "1024"}
    d = r["defaults"]  # the amortised overhead is the documented formula of the measured times
    for key, value in r["amortised_overhead"].items():
        extra = r["step_s"][key] - r["step_s"]["plain"]
        per_update = (r["eigh_all_factors_s"] if key.startswith("kfac") else 0.0) + d["n_hypersteps"] * r["hyperstep_s"]
        expected = (extra / d["curvature_every"] + per_update / d["marglik_frequency"]) / r["step_s"]["plain"]
        assert value == pytest.approx(expected, rel=1e-9), key


def test_sst2_accuracy_smoke(tiny_setup, tmp_path):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp_path / "acc.json")
    run("sst2_accuracy.py", "--model", model_dir, "--train-file", train, "--dev-file", dev, "--epochs", "1",
        "--batch-size", "8", "--sparsities", "0.5", "--recovery-sparsities", "0.5", "--recovery-steps", "1",
        "--marglik-frequency", "2", "--n-hypersteps", "2", "--posthoc-batches", "2", "--max-seq-length", "16",
        "--min-keep", "0.25", "--work-dir", str(tmp_path / "w"), "--out", out)
    r = json.load(open(out))
    assert {x["method"] for x in r["runs"]} == {"spam-opd", "posthoc-opd", "fisher", "magnitude", "random"}
    assert all("accuracy_recovered" in x for x in r["runs"])
    run("plot_sst2.py", out, "--out", str(tmp_path / "acc.png"))
    run("plot_sst2.py", out, out, "--seeds", "--out", str(tmp_path / "seeds.png"))  # two "seeds": mean ± spread
    table = open(str(tmp_path / "seeds.md")).read()
    assert "| achieved (min) |" in table and "| spam-opd + recovery |" in table
    assert os.path.getsize(tmp_path / "acc.png") > 1000


def test_training_overhead_smoke(tiny_setup, tmp_path):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp_path / "to.json")
    run("training_overhead.py", "--model-path", model_dir, "--train-file", train, "--steps", "4", "--batch-size", "4",
        "--max-seq-length", "16", "--marglik-frequency", "2", "--out", out)
    r = json.load(open(out))
    plain = r["runs"]["plain"]
    for kind in ("kfac", "diag"):  # ratios against the plain Trainer run of the same steps
        run_ = r["runs"][kind]
        assert run_["time_ratio"] == pytest.approx(run_["wall_s"] / plain["wall_s"], rel=1e-9)
        assert run_["peak_rss_ratio"] == pytest.approx(run_["peak_rss_mb"] / plain["peak_rss_mb"], rel=1e-9)


def test_export_speed_and_reprune_lab_smoke(tiny_setup, tmp_path):
    model_dir, train, dev, tmp = tiny_setup
    run_dir = str(tmp / "run")
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                 "--output-dir", run_dir, *FAST]) == 0
    out = str(tmp_path / "speed.json")
    run("export_speed.py", "--run-dir", run_dir, "--sparsities", "0.5", "--seq-len", "16", "--repeats", "1",
        "--out", out)
    r = json.load(open(out))
    row = r["rows"][0]
    assert row["bs32"]["speedup"] == pytest.approx(row["bs32"]["dense_s"] / row["bs32"]["pruned_s"], rel=1e-9)
    assert row["bs32"]["share_q25"] <= row["bs32"]["share_of_ceiling"] <= row["bs32"]["share_q75"]
    assert row["bs32"]["ceiling_s"] > 0
    # the FLOP ratio is that of the exported model: recompute it from the re-pruned export
    from spam_hf.costs import model_costs
    from spam_hf.export import from_pretrained

    assert main(["prune", run_dir, "--sparsity", "0.5", "--method", "opd", "--flops-seq-len", "16", "--measure-latency", "False",
                 "--output-dir", str(tmp_path / "p50")]) == 0
    dense = model_costs(from_pretrained(os.path.join(run_dir, "dense")), 16)["block_flops"]
    pruned = model_costs(from_pretrained(str(tmp_path / "p50" / "model")), 16)["block_flops"]
    assert row["block_flops_ratio"] == pytest.approx(dense / pruned, rel=1e-9)
    out = str(tmp_path / "lab.json")
    run("reprune_lab.py", "--run-dir", run_dir, "--dev-file", dev, "--sparsities", "0.5", "--max-seq-length", "16",
        "--out", out)
    r = json.load(open(out))
    assert len(r["rows"]) == 3 * 2  # methods × floors


def test_decoder_perplexity_smoke(tmp_path):
    from conftest import SHARED_DATA, write_text

    wiki = os.path.join(SHARED_DATA, "wikitext2", "valid.txt")
    text = tmp_path / "wiki.txt"
    if os.path.exists(wiki):  # real text when the shared data sit next to the checkout, else generated text
        with open(wiki) as f:
            text.write_text(f.read(20000))
    else:
        write_text(text, 600, 0)
    out = str(tmp_path / "dp.json")
    run("decoder_perplexity.py", "--train-file", str(text), "--test-file", str(text), "--hidden", "32", "--layers",
        "2", "--intermediate", "48", "--vocab", "300", "--block", "32", "--epochs", "1", "--eval-blocks", "10",
        "--marglik-frequency", "5", "--sparsities", "0.5", "--posthoc-batches", "3", "--work-dir", str(tmp_path / "w"),
        "--out", out)
    r = json.load(open(out))
    assert set(r["archs"]) == {"llama", "gpt2"}
    methods = {"spam-opd", "posthoc-opd", "fisher", "magnitude", "random"}
    for arch, res in r["archs"].items():
        both = methods | {m + "/kv-groups" for m in methods}  # LLaMA: query heads and whole KV groups
        assert {x["method"] for x in res["runs"]} == (both if arch == "llama" else methods)
        assert all(x["achieved"] >= 0.5 and x["perplexity"] > 1 for x in res["runs"])
    assert os.path.exists(str(tmp_path / "dp.png"))
    out = str(tmp_path / "spam_only.json")  # SpaM alone (no plain model trained), tempered likelihood
    run("decoder_perplexity.py", "--train-file", str(text), "--test-file", str(text), "--archs", "gpt2", "--hidden",
        "32", "--layers", "2", "--intermediate", "48", "--vocab", "300", "--block", "32", "--epochs", "1",
        "--eval-blocks", "10", "--marglik-frequency", "5", "--sparsities", "0.5", "--methods", "spam-opd",
        "--temperature", "0.1", "--work-dir", str(tmp_path / "w2"), "--out", out)
    r = json.load(open(out))
    assert r["args"]["temperature"] == 0.1 and r["archs"]["gpt2"]["dense_plain"]["perplexity"] is None
    assert [x["method"] for x in r["archs"]["gpt2"]["runs"]] == ["spam-opd"]


def test_lora_sst2_smoke(tiny_setup, tmp_path):
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp_path / "lora.json")
    run("lora_sst2.py", "--model", model_dir, "--train-file", train, "--dev-file", dev, "--max-train-samples", "32",
        "--max-seq-length", "16", "--epochs", "1", "--batch-size", "8", "--recovery-steps", "1,2",
        "--marglik-frequency", "2", "--score-methods", "opd,magnitude", "--adalora-lrs", "1e-3,3e-3",
        "--work-dir", str(tmp_path / "w"), "--out", out)
    r = json.load(open(out))
    sizes = {(x["method"], x["lr"]): x["adapter_size"] for x in r["runs"]}
    assert set(sizes) == {("spam-hf", 1e-3), ("spam-hf/magnitude", 1e-3), ("adalora", 1e-3), ("adalora", 3e-3),
                          ("lora", 1e-3)}
    for score in ("spam-hf", "spam-hf/magnitude"):  # pruned to at most the small LoRA's size
        assert sizes[(score, 1e-3)] <= r["lora_size_at_r_final"]
    assert set(r["runs"][0]["recovery"]) == {"1", "2"} and "accuracy_recovered" in r["runs"][1]


def test_lora_sst2_fair_smoke(tiny_setup, tmp_path):
    """Equal steps for every method (spam-hf's recovery out of its training), a per-method lr sweep on the first
    seed and the best lr on the others, the schedule method, compensation in rounds, and --resume."""
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp_path / "fair.json")
    args = ["--model", model_dir, "--train-file", train, "--dev-file", dev, "--max-train-samples", "48",
            "--max-seq-length", "16", "--epochs", "1", "--batch-size", "8", "--recovery-steps", "2",
            "--equal-steps", "--marglik-frequency", "2", "--score-methods", "damage-exact", "--rounds", "2",
            "--compensate", "--schedule", "0.2,0.6", "--schedule-every", "1", "--seeds", "0,1",
            "--methods", "spam-hf,spam-hf-schedule,lora,lora-start", "--lrs", "lora=1e-3,2e-3",
            "--work-dir", str(tmp_path / "w"), "--out", out]
    run("lora_sst2.py", *args)
    r = json.load(open(out))
    assert r["total_steps"] == 6
    runs = {(x["method"], x["lr"], x["seed"]): x for x in r["runs"]}
    lora_best = r["best_lr"]["lora"]
    assert set(runs) == {("spam-hf", 1e-3, 0), ("spam-hf", 1e-3, 1), ("spam-hf-schedule", 1e-3, 0),
                         ("spam-hf-schedule", 1e-3, 1), ("lora", 1e-3, 0), ("lora", 2e-3, 0), ("lora", lora_best, 1),
                         ("lora-start", 1e-3, 0), ("lora-start", 1e-3, 1)}
    assert lora_best == max((x for x in r["runs"] if x["method"] == "lora" and x["seed"] == 0),
                            key=lambda x: x["final_accuracy"])["lr"]
    assert all(x["train_steps"] == 6 for x in r["runs"])  # spam-hf: 4 training + 2 recovery steps
    for x in r["runs"]:
        if x["method"].startswith("spam-hf"):  # pruned to at most the small LoRA's size
            assert x["adapter_size"] <= r["lora_size_at_r_final"]
    assert runs[("lora-start", 1e-3, 0)]["adapter_size"] == 4 * r["lora_size_at_r_final"]
    run("table_lora_sst2.py", out, "--out", str(tmp_path / "fair.md"))
    table = open(tmp_path / "fair.md").read()
    assert f"| lora | {lora_best:g} | {r['lora_size_at_r_final']:,} | 2 |" in table and "| spam-hf-schedule |" in table
    assert "| spam-hf/damage-exact |" in table
    before = os.path.getmtime(out)
    res = run("lora_sst2.py", *args, "--resume")  # everything is done: nothing runs again
    assert json.load(open(out))["runs"] == r["runs"] and res.stdout == "" and os.path.getmtime(out) >= before


def test_scaling_smoke(tmp_path):
    out = str(tmp_path / "sc.json")
    run("scaling.py", "--grid", "1x64", "--batch-size", "2", "--seq-len", "8", "--repeats", "1", "--out", out)
    r = json.load(open(out))
    assert {x["kind"] for x in r["runs"]} == {"kfac", "diag"}
    for x in r["runs"]:
        assert x["state_bytes_formula"] == x["state_bytes_allocated"] > 0 and x["peak_rss_growth_bytes"] >= 0
    assert os.path.exists(str(tmp_path / "sc.png"))


def test_plot_speed_smoke(tmp_path):
    res = os.path.join(BENCH, "results", "export_speed_minilm_cpu.json")
    run("plot_speed.py", res, "--out", str(tmp_path / "speed.png"))
    assert os.path.getsize(str(tmp_path / "speed.png")) > 1000


def test_group_damage_smoke(tiny_setup, tmp_path):
    model_dir, train, dev, tmp = tiny_setup
    run_dir = str(tmp / "run")
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                 "--output-dir", run_dir, *FAST]) == 0
    out = str(tmp_path / "gd.json")
    run("group_damage.py", "--run-dirs", run_dir, "--dev-file", dev, "--sparsities", "0.5",
        "--methods", "opd,damage-exact,damage-exact+comp+rounds,mask-fisher", "--rounds", "2", "--calib-batches", "1",
        "--batch-size", "8", "--max-seq-length", "16", "--fidelity", "--fidelity-neurons", "5", "--heldout-rows", "8",
        "--recovery-methods", "damage-exact", "--recovery-steps", "1", "--work-dir", str(tmp_path / "w"), "--out", out)
    r = json.load(open(out))["runs"][0]
    assert [x["method"] for x in r["rows"]] == ["opd", "damage-exact", "damage-exact+comp+rounds", "mask-fisher"]
    assert all(x["achieved"] >= 0.5 for x in r["rows"]) and "accuracy_recovered" in r["rows"][1]
    assert r["fidelity"]["groups"] == 2 * 4 + 5 and r["fidelity"]["heads"] == 8
    assert {"opd", "damage", "damage-out", "damage-obs", "damage-exact", "mask-fisher",
            "magnitude"} <= set(r["fidelity"])
    run("table_group_damage.py", out, out, "--out", str(tmp_path / "gd"))  # the same run twice: "two seeds"
    table = open(str(tmp_path / "gd.md")).read()
    acc = 100 * r["rows"][0]["accuracy"]
    # rows name a calibration count other than the default 8
    assert f"| opd (1 calib. batches) | {acc:.1f} ± 0.0 |" in table
    assert "| damage-exact (1 calib. batches) + recovery |" in table
    assert os.path.getsize(str(tmp_path / "gd.png")) > 1000


def test_scaling_out_smoke(tiny_setup, tmp_path):
    """1 vs 2 processes (torchrun, gloo) of the whole compress job: both finish, the ratio is recomputed."""
    model_dir, train, dev, tmp = tiny_setup
    out = str(tmp_path / "so.json")
    run("scaling_out.py", "--model", model_dir, "--train-file", train, "--dev-file", dev, "--rows", "32",
        "--batch", "8", "--max-seq-length", "16", "--work-dir", str(tmp_path / "w"), "--out", out)
    res = json.load(open(out))
    one, two = res["runs"]
    assert (one["processes"], one["per_process_batch"]) == (1, 8) and (two["processes"], two["per_process_batch"]) == (2, 4)
    assert res["speedup"] == pytest.approx(one["wall_s"] / two["wall_s"])
    assert one["accuracy"] is not None and two["accuracy"] is not None



def test_table_schedule_smoke(tiny_setup, tmp_path):
    """A real schedule run and its recovered prune, collected; a run without a schedule is refused."""
    model_dir, train, dev, tmp = tiny_setup
    run_dir, plain_dir = str(tmp / "sched"), str(tmp / "plain")
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                 "--schedule_sparsity", "0.5", "--schedule_every", "1", "--output-dir", run_dir, *FAST]) == 0
    assert main(["prune", run_dir, "--sparsity", "0.5", "--recovery_steps", "1",
                 "--output_dir", os.path.join(run_dir, "rec1")]) == 0
    out = str(tmp_path / "sched")
    run("table_schedule.py", "--run-dirs", run_dir, "--recovery-dir", "rec1", "--out", out)
    (row,) = json.load(open(out + ".json"))["rows"]
    report = json.load(open(os.path.join(run_dir, "pruning_report.json")))
    rec = json.load(open(os.path.join(run_dir, "rec1", "pruning_report.json")))
    assert row["sparsity"] == 0.5 and row["schedule"]["schedule_sparsity"] == 0.5 and row["achieved"] >= 0.5
    assert row["accuracy"] == report["pruned"]["accuracy"] and row["recovered"] == rec["pruned"]["accuracy"]
    assert row["recovery_steps"] == 1
    assert row["device"] == report["device"] and json.load(open(out + ".json"))["devices"] == [report["device"]]
    md = open(out + ".md").read()
    assert f"| 50% | during training | {row['seed']} |" in md and f"{100 * row['recovered']:.1f} (1)" in md
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                 "--output-dir", plain_dir, *FAST]) == 0
    res = subprocess.run([sys.executable, os.path.join(BENCH, "table_schedule.py"), "--run-dirs", plain_dir,
                          "--out", out], capture_output=True, text=True)
    assert res.returncode != 0 and "was not trained with --schedule_sparsity" in res.stderr
    # the comparison in the same table: runs pruned after training, listed before the scheduled ones
    run("table_schedule.py", "--run-dirs", run_dir, "--after-training-dirs", plain_dir, "--recovery-dir", "rec1",
        "--out", out)
    rows = json.load(open(out + ".json"))["rows"]
    plain = json.load(open(os.path.join(plain_dir, "pruning_report.json")))
    assert [r["pruned"] for r in rows] == ["during training", "after training"]
    assert rows[1]["accuracy"] == plain["pruned"]["accuracy"] and "recovered" not in rows[1]
    md = open(out + ".md").read()
    assert md.index("| 50% | after training |") < md.index("| 50% | during training |")
    res = subprocess.run([sys.executable, os.path.join(BENCH, "table_schedule.py"), "--run-dirs", run_dir,
                          "--after-training-dirs", run_dir, "--out", out], capture_output=True, text=True)
    assert res.returncode != 0 and "not a run pruned after training" in res.stderr


def test_table_prune_groups_outputs_by_label(tmp_path):
    """table_prune: the seed from the parent run's config, mean ± std per label, the fewest heads in a layer."""
    def output(run, sub, seed, acc, heads):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "run_config.json").write_text(json.dumps({"training": {"seed": seed}}))
        (tmp_path / run / sub).mkdir()
        layers = [{"layer": i, "heads_kept": h, "neurons_kept": 10} for i, h in enumerate(heads)]
        (tmp_path / run / sub / "pruning_report.json").write_text(json.dumps(
            {"metric": "accuracy", "pruned": {"accuracy": acc}, "min_keep": 0.05, "command": "spam-hf prune",
             "selection": {"sparsity_target": 0.9, "sparsity_achieved": 0.901, "layers": layers}}))
        return str(tmp_path / run / sub)

    a = [output(f"r{s}", "floor", s, acc, [2, 1]) for s, acc in ((0, 0.75), (1, 0.77))]
    b = [output(f"r{s}", "none", s, acc, [3, 0]) for s, acc in ((0, 0.5), (1, 0.7))]
    out = str(tmp_path / "t")
    run("table_prune.py", "--group", "floor=" + ",".join(a), "--group", "none=" + ",".join(b), "--out", out)
    md = open(out + ".md").read()
    assert "| floor | 90% | 0,1 | 90.1% | 76.0 ± 1.4 | 75.0 / 77.0 | 1 / 1 |" in md
    assert "| none | 90% | 0,1 | 90.1% | 60.0 ± 14.1 | 50.0 / 70.0 | 0 / 0 |" in md
    rows = json.load(open(out + ".json"))["rows"]
    assert [r["seed"] for r in rows] == [0, 1, 0, 1] and rows[0]["min_keep"] == 0.05
    # with a recovery fine-tune: the accuracy before it and its learning rate get columns
    rec = str(tmp_path / "r0" / "rec")
    shutil.copytree(a[0], rec)
    report = json.load(open(os.path.join(rec, "pruning_report.json")))
    report["pruned"].update(accuracy=0.8, accuracy_before_recovery=0.75)
    report["recovery"] = {"steps": 200, "lr": 2e-4}
    json.dump(report, open(os.path.join(rec, "pruning_report.json"), "w"))
    run("table_prune.py", "--group", "rec=" + rec, "--group", "floor=" + a[1], "--out", out)
    md = open(out + ".md").read()
    assert "| rec | 90% | 0 | 90.1% | 75.0 | 2e-4 | 80.0 | 80.0 | 1 |" in md
    assert "| floor | 90% | 1 | 90.1% | – | – | 77.0 | 77.0 | 1 |" in md
    assert json.load(open(out + ".json"))["rows"][0]["recovery_lr"] == 2e-4
    res = subprocess.run([sys.executable, os.path.join(BENCH, "table_prune.py"), "--group", "x=" + str(tmp_path),
                          "--out", out], capture_output=True, text=True)
    assert res.returncode != 0 and "no pruning_report.json" in res.stderr


def test_scale_smoke(tmp_path):
    """benchmarks/scale.py on its tiny shape: both pruning paths in child processes, then the whole compress job
    (with its dry run's prediction) on generated text."""
    from conftest import write_text

    out = str(tmp_path / "scale.json")
    run("scale.py", "--shape", "tiny", "--layers", "2", "--calibration-batches", "2", "--batch-size", "2",
        "--seq-len", "16", "--out", out)
    rows = {r["path"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"all-at-once", "sequential"} and all(r["achieved"] >= 0.3 for r in rows.values())
    assert rows["sequential"]["extra_vs_all_at_once"] > 0
    data = tmp_path / "data"
    data.mkdir()
    for name, seed in (("test.txt", 0), ("valid.txt", 1)):
        write_text(data / name, 400, seed)
    out = str(tmp_path / "scale_cli.json")
    run("scale.py", "--cli", "--shape", "tiny", "--data-dir", str(data), "--work-dir", str(tmp_path / "work"),
        "--calibration-batches", "2", "--batch-size", "2", "--seq-len", "16", "--extra=--sequential=True",
        "--out", out)
    row = json.load(open(out))["rows"][0]
    assert row["returncode"] == 0 and row["sequential"] and row["achieved"] >= 0.3
    assert row["predicted_peak_gib"] > 0 and row["peak_rss_gib"] > row["weights_gib"]


def test_scale_training_smoke(tmp_path):
    """benchmarks/scale_training.py on its tiny shape: every configuration in a child process, one prior update each
    SpaM run, ratios against the plain run of the same kind."""
    out = str(tmp_path / "train.json")
    run("scale_training.py", "--shape", "tiny", "--layers", "2", "--steps", "4", "--seq-len", "16", "--lora-r", "4",
        "--out", out)
    runs = json.load(open(out))["runs"]
    assert set(runs) == {"plain", "kfac", "diag", "lora-plain", "lora-spam"}
    for cfg in ("kfac", "diag", "lora-spam"):
        assert runs[cfg]["prior_updates"] == 1 and runs[cfg]["time_ratio"] > 0 and runs[cfg]["peak_ratio"] > 0
    assert runs["lora-plain"]["trainable_params"] < runs["plain"]["trainable_params"]


def test_sharded_training_smoke(tmp_path):
    """benchmarks/sharded_training.py on its tiny shape: one process, DDP and FSDP2 on two (torchrun, gloo) and a
    plain Trainer under FSDP2; FSDP2 processes hold half the training state each, and its priors equal DDP's up to
    float32 round-off."""
    out = str(tmp_path / "sharded.json")
    run("sharded_training.py", "--shape", "tiny", "--layers", "2", "--steps", "3", "--seq-len", "16",
        "--work-dir", str(tmp_path / "work"), "--out", out)
    runs = json.load(open(out))["runs"]
    assert set(runs) == {"one", "ddp", "fsdp2", "fsdp2-plain"}
    assert [len(runs[c]["per_process"]) for c in ("one", "ddp", "fsdp2")] == [1, 2, 2]
    assert runs["fsdp2"]["training_state_gib_ratio"] == pytest.approx(0.5, abs=0.01)
    assert runs["ddp"]["training_state_gib_ratio"] == 1.0 and 0 < runs["fsdp2"]["curvature_peak_mib_ratio"] < 1
    assert runs["fsdp2"]["log_prior_max_diff_vs_ddp"] < 1e-3 and runs["fsdp2"]["time_vs_plain_fsdp2"] > 0


def test_sharded_pruning_smoke(tmp_path):
    """benchmarks/sharded_pruning.py on its tiny shape: block by block in one process, on unsharded copies and on an
    FSDP2-sharded model (two processes, torchrun, gloo); FSDP2 keeps the unsharded processes' groups and logits while
    each process holds half the weights, before and after pruning."""
    out = str(tmp_path / "pruning.json")
    run("sharded_pruning.py", "--shape", "tiny", "--layers", "2", "--seq-len", "16", "--calibration-batches", "2",
        "--work-dir", str(tmp_path / "work"), "--out", out)
    runs = json.load(open(out))["runs"]
    assert set(runs) == {"one", "unsharded", "fsdp2"} and runs["fsdp2"]["achieved"] >= 0.5
    assert runs["fsdp2"]["kept_equal_vs_unsharded"] and runs["fsdp2"]["logits_max_diff_vs_unsharded"] < 1e-4
    assert runs["fsdp2"]["weights_before_gib_ratio"] == pytest.approx(0.5, abs=0.01)
    one, sharded = runs["one"]["per_process"][0], runs["fsdp2"]["per_process"]
    assert all(r["weights_after_gib"] <= 0.51 * one["weights_after_gib"] + 1e-3 for r in sharded)


def test_decoder_peers_smoke(tmp_path):
    """benchmarks/decoder_peers.py on a tiny decoder: every method at one sparsity, two pruning seeds, with each
    method's own defaults (flap: bias compensation; the default: damage-obs in rounds with least squares)."""
    from conftest import SHARED_DATA, write_text

    wiki = os.path.join(SHARED_DATA, "wikitext2", "valid.txt")
    text = tmp_path / "wiki.txt"
    if os.path.exists(wiki):
        with open(wiki) as f:
            text.write_text(f.read(20000))
    else:
        write_text(text, 600, 0)
    out = str(tmp_path / "peers.json")
    run("decoder_peers.py", "--train-file", str(text), "--test-file", str(text), "--hidden", "32", "--layers", "2",
        "--heads", "4", "--kv-heads", "2", "--intermediate", "48", "--vocab", "300", "--block", "32", "--epochs", "1",
        "--eval-blocks", "10", "--marglik-frequency", "5", "--sparsities", "0.5", "--seeds", "0,1",
        "--calibration-batches", "2", "--work-dir", str(tmp_path / "w"), "--out", out)
    r = json.load(open(out))
    methods = {"spam", "damage-obs", "flap", "wanda-sp", "magnitude", "random"}
    assert {x["method"] for x in r["runs"]} == methods and len(r["runs"]) == 12
    assert all(x["achieved"] >= 0.5 - 1e-9 and x["perplexity"] > 1 for x in r["runs"]), \
        [(x["method"], x["seed"], x["achieved"]) for x in r["runs"]]
    configs = {x["method"]: x["config"] for x in r["runs"]}
    assert configs["flap"]["compensation"] == "bias" and configs["flap"]["compensate"]
    assert configs["spam"]["method"] == "damage-obs" and configs["damage-obs"]["compensate"]
    assert set(r["summary"]) == methods and r["summary"]["random"]["0.5"]["n"] == 2


def test_decoder_peers_merge_and_relative_summary(tmp_path):
    """--merge combines invocations over disjoint seeds; the summary's increase is over the dense model each method
    pruned (SpaM's for spam, the plain one otherwise) of that seed's trained pair. Overlapping seeds are refused."""
    def part(seed, plain, spam, ppl):
        return {"date": "2026-12-07", "command": f"run {seed}", "args": {"train_per_seed": True, "seed": 0},
                "trained": {str(seed): {"dense_perplexity": {"plain": plain, "spam": spam}}},
                "runs": [{"method": "spam", "sparsity": 0.3, "seed": seed, "perplexity": ppl[0]},
                         {"method": "random", "sparsity": 0.3, "seed": seed, "perplexity": ppl[1]}]}

    paths = []
    for i, p in enumerate([part(0, 100.0, 50.0, (55.0, 150.0)), part(1, 200.0, 80.0, (80.0, 200.0))]):
        paths.append(str(tmp_path / f"p{i}.json"))
        json.dump(p, open(paths[-1], "w"))
    out = str(tmp_path / "merged.json")
    run("decoder_peers.py", "--merge", *paths, "--out", out)
    r = json.load(open(out))
    assert r["command"] == ["run 0", "run 1"] and set(r["trained"]) == {"0", "1"} and len(r["runs"]) == 4
    assert r["summary"]["spam"]["0.3"]["increase_pct"] == 5.0  # (10% + 0%) / 2
    assert r["summary"]["random"]["0.3"]["increase_pct"] == 25.0 and r["summary"]["random"]["0.3"]["mean"] == 175.0
    with pytest.raises(AssertionError, match="share seeds"):
        run("decoder_peers.py", "--merge", paths[0], paths[0], "--out", out)


def test_frontier_smoke(tiny_setup, tmp_path):
    """frontier.py: accuracy per label from a table_prune result, each export timed against the dense model in the
    same run (the speed-up is the ratio of its own medians' run-wise ratios), the peers' points carried over."""
    model_dir, train, dev, tmp = tiny_setup
    run_dir = str(tmp / "frontier-run")
    assert main(["compress", model_dir, "--train-file", train, "--validation-file", dev, "--sparsity", "0.5",
                 "--output-dir", run_dir, "--measure-latency", "False", *FAST]) == 0
    rows = [{"label": "50%", "accuracy": a} for a in (0.80, 0.84)]
    json.dump({"rows": rows}, open(tmp_path / "acc.json", "w"))
    peers = {"source": "test", "methods": [{"name": "peer", "points": [{"sparsity": 0.5, "accuracy": 70.0,
                                                                         "speedup": 1.5}]}]}
    json.dump(peers, open(tmp_path / "peers.json", "w"))
    out = str(tmp_path / "frontier")
    run("frontier.py", "--accuracy", str(tmp_path / "acc.json"), "--label", "0.5=50%", "--dense",
        os.path.join(run_dir, "dense"), "--export", "0.5=" + os.path.join(run_dir, "model"), "--peers",
        str(tmp_path / "peers.json"), "--seq-len", "16", "--repeats", "3", "--out", out)
    r = json.load(open(out + ".json"))
    row = r["rows"][0]
    assert row["accuracy"] == pytest.approx(82.0) and row["accuracy_std"] == pytest.approx(2 ** 0.5 * 2.0)
    assert row["seeds"] == 2 and row["speedup_q25"] <= row["speedup"] <= row["speedup_q75"]
    assert r["peers"] == peers and r["threads"] == 1 and os.path.getsize(out + ".png") > 0
    res = subprocess.run([sys.executable, os.path.join(BENCH, "frontier.py"), "--accuracy", str(tmp_path / "acc.json"),
                          "--label", "0.5=90%", "--dense", os.path.join(run_dir, "dense"), "--export",
                          "0.5=" + os.path.join(run_dir, "model"), "--peers", str(tmp_path / "peers.json"),
                          "--seq-len", "16", "--repeats", "1", "--out", out], capture_output=True, text=True)
    assert res.returncode != 0 and "no rows labelled '90%'" in res.stderr


def test_deploy_speed_smoke(tmp_path):
    """benchmarks/deploy_speed.py on a tiny BERT: the export and its uniform ceiling (same heads and neurons in
    all, spread evenly: the same FLOPs) timed against dense and against each other in PyTorch and ONNX Runtime;
    the accuracy comes from the run report beside the export."""
    pytest.importorskip("onnxruntime")
    import torch

    from conftest import tiny_classifier, tiny_tokenizer
    from spam_hf.architectures import group_specs
    from spam_hf.export import save_pruned
    from spam_hf.pruning import prune_groups

    dense = str(tmp_path / "dense")
    tiny_classifier("bert").save_pretrained(dense)
    tiny_tokenizer(dense)
    model = tiny_classifier("bert")
    keep = {s.name: torch.arange(s.count // 4 if s.layer == 0 else 3 * s.count // 4) for s in group_specs(model)}
    prune_groups(model, keep)  # layer 0 keeps a quarter, layer 1 three quarters: uneven, half on average
    save_pruned(model, str(tmp_path / "run" / "model"), tokenizer=tiny_tokenizer(str(tmp_path / "tok")))
    json.dump({"metric": "accuracy", "pruned": {"accuracy": 0.75}}, open(tmp_path / "run" / "pruning_report.json", "w"))
    out = str(tmp_path / "deploy")
    run("deploy_speed.py", "--dense", dense, "--export", f"half={tmp_path / 'run' / 'model'}", "--batch-sizes", "2",
        "--seq-len", "16", "--repeats", "1", "--threads", "1", "--out", out)
    row = json.load(open(out + ".json"))["rows"][0]
    assert row["label"] == "half" and row["accuracy"] == 0.75 and 0.3 < row["flops_left"] < 0.7
    assert row["ceiling_flops_left"] == pytest.approx(row["flops_left"], rel=1e-9)
    for key in ("torch_vs_dense", "torch_vs_ceiling", "ort_vs_dense", "ort_vs_ceiling"):
        assert row["bs2"][key]["speedup"] > 0 and row["bs2"][key]["batch_size"] == 2
    assert "| half | 75.0 |" in open(out + ".md").read()


def test_uniform_ceiling_has_the_exports_parameters_when_heads_do_not_divide_evenly():
    """deploy_speed's ceiling: 3 heads over 2 layers cannot be spread evenly (2 per layer), so the neurons per layer
    make up the difference: the ceiling's prunable parameters are within one neuron per layer of the export's, and
    every layer has the same shape."""
    import sys

    import torch

    from conftest import tiny_classifier
    from spam_hf.architectures import group_specs
    from spam_hf.pruning import prune_groups
    from spam_hf.pruning.selection import group_costs, prunable_cost

    sys.path.insert(0, BENCH)
    from deploy_speed import uniform_ceiling

    dense, export = tiny_classifier("bert"), tiny_classifier("bert")
    keep = {s.name: torch.arange({"head": [1, 2], "neuron": [10, 30]}[s.kind][s.layer]) for s in group_specs(export)}
    prune_groups(export, keep)
    ceiling = uniform_ceiling(dense, export)
    specs = group_specs(ceiling)
    assert {s.count for s in specs if s.kind == "head"} == {2} and len({s.count for s in specs if s.kind == "neuron"}) == 1
    neuron_cost = float(group_costs(dense, [s for s in group_specs(dense) if s.kind == "neuron"][0], "params", 128)[0])
    gap = prunable_cost(ceiling, specs, "params", 128) - prunable_cost(export, group_specs(export), "params", 128)
    assert abs(gap) <= 2 * neuron_cost / 2 + 1e-9  # half a neuron in each of the 2 layers
    assert prunable_cost(ceiling, specs, "params", 128) < prunable_cost(dense, group_specs(dense), "params", 128)


def test_profile_export_smoke(tmp_path):
    """benchmarks/profile_export.py on a tiny uneven BERT export: per-operator times of the export and its uniform
    ceiling, the same operators called as often in both (uneven layers add no operator), totals that add up."""
    import torch

    from conftest import tiny_classifier
    from spam_hf.architectures import group_specs
    from spam_hf.export import save_pruned
    from spam_hf.pruning import prune_groups

    dense = str(tmp_path / "dense")
    tiny_classifier("bert").save_pretrained(dense)
    model = tiny_classifier("bert")
    keep = {s.name: torch.arange(s.count // 4 if s.layer == 0 else 3 * s.count // 4) for s in group_specs(model)}
    prune_groups(model, keep)
    save_pruned(model, str(tmp_path / "export"))
    out = str(tmp_path / "prof.json")
    run("profile_export.py", "--dense", dense, "--export", str(tmp_path / "export"), "--seq-len", "16",
        "--forwards", "3", "--threads", "1", "--out", out)
    r = json.load(open(out))
    ops = {row["op"]: row for row in r["ops"]}
    assert ops["aten::addmm"]["export_calls"] == ops["aten::addmm"]["ceiling_calls"] > 0
    # each row is rounded to 0.1 µs
    assert r["export_us_per_forward"] == pytest.approx(sum(row["export_us"] for row in r["ops"]), abs=0.1 * len(ops))
    assert sum(r["export_groups"].values()) > 0 and sum(r["ceiling_groups"].values()) > 0
