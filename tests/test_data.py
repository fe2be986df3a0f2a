"""Data loading: packaged sample, local files, presets, column and label checks."""

import os

import pytest

from spam_hf.data import TASKS, DataArguments, load_raw_data, packaged_sst2_files

from conftest import SHARED_DATA


def test_packaged_sample_is_small_real_sst2():
    train, dev = packaged_sst2_files()
    dsd, text, pair, label = load_raw_data(DataArguments())
    assert (text, pair, label) == ("sentence", None, "label")
    assert len(dsd["train"]) == 2000 and len(dsd["validation"]) == 872
    assert len(dsd["train"]) + len(dsd["validation"]) <= 3000
    assert dsd.num_labels == 2
    # rows are verbatim copies of the shared data (no quoting damage)
    shared_dev = os.path.join(SHARED_DATA, "sst2", "dev.tsv")
    if os.path.exists(shared_dev):
        assert open(shared_dev).read() == open(dev).read()


def test_local_tsv_with_string_labels_and_subset(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("text\tlabel\n" + "".join(f"row {i} \"quoted\" \t{'pos' if i % 2 else 'neg'}\n" for i in range(30)))
    dsd, text, _, label = load_raw_data(DataArguments(train_file=str(f), max_train_samples=10))
    assert text == "text"
    assert len(dsd["train"]) == 10 and len(dsd["validation"]) == 3  # 10% split when no validation file
    assert set(dsd["train"]["label"]) <= {0, 1} and dsd.label_names == ["neg", "pos"]
    assert '"quoted"' in dsd["train"][0]["text"]


def test_json_lines(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"review": "r{i}", "stars": {i % 3}}}\n' for i in range(12)))
    dsd, text, _, label = load_raw_data(DataArguments(train_file=str(f), text_column="review", label_column="stars"))
    assert dsd.num_labels == 3


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst3'; supported: sst2"):
        DataArguments(task="sst3")
    with pytest.raises(ValueError, match="does not exist"):
        DataArguments(train_file=str(tmp_path / "nope.csv"))
    bad = tmp_path / "x.parquet"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_raw_data(DataArguments(train_file=str(bad)))
    with pytest.raises(ValueError, match="could not be loaded.*offline"):
        load_raw_data(DataArguments(task="sst2"))
    assert "mnli" in TASKS and TASKS["mnli"].pair == "hypothesis"
