"""Data loading: packaged sample, local files, presets, column and label checks."""

import os

import pytest

from spam_hf.arguments import DataArguments
from spam_hf.data import TASKS, load_raw_data, packaged_sst2_files

from conftest import SHARED_DATA


def test_packaged_sample_is_small_real_sst2():
    train, dev = packaged_sst2_files()
    dsd, text, pair, label = load_raw_data(DataArguments())
    assert (text, pair, label) == ("sentence", None, "label")
    assert len(dsd["train"]) == 2000 and len(dsd["validation"]) == 872
    assert len(dsd["train"]) + len(dsd["validation"]) <= 3000
    assert dsd.num_labels == 2 and dsd.label_names == ["negative", "positive"]  # label 1 = positive
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
    with pytest.raises(ValueError, match="task must be one of sst2, .*; got 'sst3'"):
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


def test_text_files_are_language_modelling_and_pack_into_blocks(tmp_path):
    from spam_hf.data import tokenize

    from conftest import tiny_tokenizer, write_text

    train, valid = write_text(tmp_path / "t.txt", 50, 0), write_text(tmp_path / "v.txt", 20, 1)
    args = DataArguments(train_file=train, validation_file=valid, max_seq_length=16)
    assert args.is_causal_lm and args.metric == "perplexity"
    raw, text, pair, label = load_raw_data(args)
    assert (text, pair, label) == ("text", None, None)
    tok = tiny_tokenizer(str(tmp_path / "tok"))
    data = tokenize(raw, tok, text, pair, label, 16)
    assert data.num_labels is None
    # every block is 16 tokens, labels == input_ids, and the blocks are the concatenated text in order
    ids = [t for line in raw["train"]["text"] for t in tok(line, add_special_tokens=False)["input_ids"]]
    blocks = data["train"]["input_ids"]
    assert all(len(b) == 16 for b in blocks) and data["train"]["labels"] == blocks
    assert [t for b in blocks for t in b] == ids[: len(blocks) * 16]
    assert len(ids) - len(blocks) * 16 < 16  # only the remainder is dropped (one 1,000-line batch here)
    with pytest.raises(ValueError, match="fewer than 4096 tokens"):
        tokenize(raw, tok, text, pair, label, 4096)


def test_wikitext_preset_is_causal_lm_and_checks_file_type(tmp_path):
    assert TASKS["wikitext"].kind == "causal_lm" and DataArguments(task="wikitext").is_causal_lm
    bad = tmp_path / "x.tsv"
    bad.write_text("sentence\tlabel\na\t0\n")
    with pytest.raises(ValueError, match="language modelling: --train-file must be .txt"):
        DataArguments(task="wikitext", train_file=str(bad))
    from conftest import write_text

    wiki = os.path.join(SHARED_DATA, "wikitext2", "valid.txt")
    if not os.path.exists(wiki):  # the shared data are not next to every checkout (CI)
        wiki = write_text(tmp_path / "wiki.txt", 400, 0)
    raw, text, _, label = load_raw_data(DataArguments(task="wikitext", train_file=wiki, max_train_samples=200))
    assert label is None and len(raw["train"]) == 200 and len(raw["validation"]) > 0


def _tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return str(path)


def test_missing_labels_are_errors_not_classes(tmp_path):
    """Empty and NaN label cells used to become extra classes and shift the real ones."""
    for cell in ("", "nan", "NaN"):
        train = _tsv(tmp_path / "t.tsv", [("a", 0), ("b", 1), ("c", cell), ("d", 1)])
        with pytest.raises(ValueError, match=r"train: 1 row\(s\) have no label in column 'label' \(lines 4\)"):
            load_raw_data(DataArguments(train_file=train, validation_file=_tsv(tmp_path / "v.tsv", [("e", 1)])))


def test_label_names_name_the_classes_in_label_order(tmp_path):
    train = _tsv(tmp_path / "t.tsv", [("a", 0), ("b", 1), ("c", 1)])
    dev = _tsv(tmp_path / "d.tsv", [("e", 1)])
    raw, _, _, _ = load_raw_data(DataArguments(train_file=train, validation_file=dev))
    assert raw.label_names == ["0", "1"]  # integer labels name themselves
    raw, _, _, _ = load_raw_data(DataArguments(train_file=train, validation_file=dev, class_names="bad, good"))
    assert raw.label_names == ["bad", "good"]
    with pytest.raises(ValueError, match="--class-names gives 3 name.s. .a, b, c. but the training labels define 2"):
        load_raw_data(DataArguments(train_file=train, validation_file=dev, class_names="a,b,c"))
    lm = tmp_path / "t.txt"
    lm.write_text("some text\n" * 5)
    with pytest.raises(ValueError, match="language modelling has none"):
        load_raw_data(DataArguments(train_file=str(lm), class_names="a,b"))


def test_labels_with_gaps_become_contiguous_classes(tmp_path):
    """Labels 0/1/7 used to give an 8-class head (and 0% accuracy); now 3 classes named 0, 1, 7."""
    train = _tsv(tmp_path / "t.tsv", [("a", 0), ("b", 7), ("c", 1), ("d", 7)])
    dev = _tsv(tmp_path / "d.tsv", [("e", 7), ("f", 0)])
    raw, _, _, label = load_raw_data(DataArguments(train_file=train, validation_file=dev))
    assert raw.num_labels == 3 and raw.label_names == ["0", "1", "7"]
    assert raw["train"][label] == [0, 2, 1, 2] and raw["validation"][label] == [2, 0]
    bad_dev = _tsv(tmp_path / "b.tsv", [("e", 5)])
    with pytest.raises(ValueError, match=r"validation labels out of range: \[5\]"):
        load_raw_data(DataArguments(train_file=train, validation_file=bad_dev))
    # contiguous integers stay as they are
    raw, _, _, label = load_raw_data(DataArguments(train_file=_tsv(tmp_path / "c.tsv", [("a", 1), ("b", 0)]),
                                                   validation_file=_tsv(tmp_path / "v.tsv", [("e", 0)])))
    assert raw.num_labels == 2 and raw["train"][label] == [1, 0]


def test_fractional_labels_are_an_error_and_integral_floats_are_classes(tmp_path, caplog):
    """Labels 0.5 / 1.5 (a regression file) used to become a 4-class problem; integral floats (0.0 / 1.0 in JSON)
    are the classes 0 / 1 without the old self-contradicting 'labels [0, 1] are not 0..1' warning."""
    import json
    import logging

    train = _tsv(tmp_path / "t.tsv", [("a", 0.5), ("b", 1.5), ("c", 0.5), ("d", 2.0)])
    with pytest.raises(ValueError, match=r"column 'label' holds non-integer numbers \(0.5, 1.5\)"):
        load_raw_data(DataArguments(train_file=train, validation_file=_tsv(tmp_path / "v.tsv", [("e", 0.5)])))
    rows = [{"sentence": s, "label": v} for s, v in (("a", 0.0), ("b", 1.0), ("c", 1.0))]
    for name, data in (("t.jsonl", rows), ("v.jsonl", rows[:1])):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in data) + "\n")
    with caplog.at_level(logging.WARNING):
        raw, _, _, label = load_raw_data(DataArguments(train_file=str(tmp_path / "t.jsonl"),
                                                       validation_file=str(tmp_path / "v.jsonl")))
    assert raw.num_labels == 2 and raw["train"][label] == [0, 1, 1]
    assert "are not 0.." not in caplog.text


def test_unreadable_data_files_name_the_file(tmp_path):
    binary = tmp_path / "train.tsv"
    binary.write_bytes(b"sentence\tlabel\n\x86\x87\xff\t1\n")
    with pytest.raises(ValueError, match=f"{binary} is not UTF-8 text"):
        load_raw_data(DataArguments(train_file=str(binary)))
    broken = tmp_path / "train.jsonl"
    broken.write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match=f"could not read {broken}"):
        load_raw_data(DataArguments(train_file=str(broken)))
