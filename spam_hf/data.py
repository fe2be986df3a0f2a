"""Training / evaluation data: task presets, Hub names or local csv/tsv/json/txt files, tokenisation.

Every loader returns a ``DatasetDict`` with ``train`` and ``validation`` splits. Classification
data hold the text column(s) and an integer ``label`` column; language-modelling data (``--task
wikitext`` or ``.txt`` files) hold one ``text`` column. :func:`tokenize` turns either into model
inputs: padded-later sequences with labels, or packed blocks of ``max_seq_length`` tokens whose
``labels`` are the ``input_ids`` (the causal-LM model shifts them).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, List, Optional, Tuple

from datasets import ClassLabel, DatasetDict, load_dataset
from transformers.utils import logging

from .choices import LM_EXTENSIONS, TASKS, TaskPreset  # noqa: F401  (re-exported: the data module's presets)

if TYPE_CHECKING:  # the dataclass lives with the other arguments
    from .arguments import DataArguments

logger = logging.get_logger("spam_hf")

PACKAGE_DATA = os.path.join(os.path.dirname(__file__), "sample_data")
PACKAGED_LABEL_NAMES = ("negative", "positive")
"""The packaged SST-2 sample's classes 0 and 1 (``sample_data/README.md``)."""




def packaged_sst2_files() -> Tuple[str, str]:
    """The packaged SST-2 sample (2,000 train rows, 872 dev rows)."""
    return (os.path.join(PACKAGE_DATA, "sst2_sample_train.tsv"), os.path.join(PACKAGE_DATA, "sst2_sample_dev.tsv"))


def _load_files(train: str, validation: Optional[str]) -> DatasetDict:
    ext = os.path.splitext(train)[1].lower()
    files = {"train": train}
    if validation:
        files["validation"] = validation
    header_lines = 1 if ext in (".tsv", ".csv") else 0
    for split, path in files.items():
        try:
            with open(path, encoding="utf-8") as f:
                rows = sum(1 for line in f if line.strip())
        except UnicodeDecodeError as e:
            raise ValueError(f"the {split} file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        if rows <= header_lines:
            raise ValueError(f"the {split} data set is empty: {path} has no data rows")
    if ext in (".tsv", ".csv"):
        kw = dict(delimiter="\t", quoting=3) if ext == ".tsv" else {}
        builder, kw = "csv", dict(keep_default_na=False, **kw)
    elif ext in (".json", ".jsonl"):
        builder, kw = "json", {}
    elif ext in LM_EXTENSIONS:
        builder, kw = "text", {}
    else:
        raise ValueError(f"unsupported data file type {ext!r} for {train}; use .csv, .tsv, .json, .jsonl or .txt")
    try:
        return load_dataset(builder, data_files=files, **kw)
    except Exception as e:  # a corrupt JSON / CSV file: datasets' own message does not say which one
        cause = e.__cause__ or e
        first = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"could not read {' or '.join(files.values())} as {ext} data: {type(cause).__name__}: "
                         f"{first}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "TRUE", "YES")


def load_raw_data(args: DataArguments) -> Tuple[DatasetDict, str, Optional[str], str]:
    """Load the data; returns ``(DatasetDict(train, validation), text, text_pair, label)`` column names."""
    if args.train_file or args.uses_packaged_sample:
        train, dev = (args.train_file, args.validation_file) if args.train_file else packaged_sst2_files()
        dsd = _load_files(train, dev)
        preset = TASKS.get(args.task or "")
    else:
        preset = TASKS[args.task]
        try:
            raw = load_dataset(*preset.hub)
        except Exception as e:  # offline and not cached, or no network
            hint = " (offline: HF_HUB_OFFLINE is set)" if _hub_offline() else ""
            raise ValueError(f"dataset {'/'.join(preset.hub)} for task {args.task!r} could not be loaded{hint}: "
                             f"{type(e).__name__}. Pass local files with --train-file/--validation-file") from None
        dsd = DatasetDict(train=raw[preset.train_split], validation=raw[preset.eval_split])
    columns = dsd["train"].column_names
    text = args.text_column or (preset.text if preset else next((c for c in ("sentence", "text") if c in columns), None))
    pair = args.text_pair_column or (preset.pair if preset else None)
    label = args.label_column or (preset.label if preset else "label")
    if args.is_causal_lm:
        pair = label = None
    for split, ds in dsd.items():
        for role, col in (("text", text), ("text pair", pair), ("label", label)):
            if role == "label" and args.is_causal_lm:
                continue
            if role != "text pair" and col is None:
                raise ValueError(f"no {role} column given and none found; available columns: {', '.join(ds.column_names)}")
            if col is not None and col not in ds.column_names:
                raise ValueError(f"{split} data has no {role} column {col!r}; available columns: {', '.join(ds.column_names)}")
        if len(ds) == 0:
            raise ValueError(f"the {split} data set is empty")
        if label is not None:  # before any split or subset, so that the line numbers are the file's
            missing = [i for i, v in enumerate(ds[label]) if _missing(v)]
            if missing:
                rows = ", ".join(str(i + 2) for i in missing[:5])  # +2: the header line, 1-based lines
                raise ValueError(f"{split}: {len(missing)} row(s) have no label in column {label!r} (lines {rows}"
                                 f"{', ...' if len(missing) > 5 else ''}); fill or drop them")
    if "validation" not in dsd:
        split = dsd["train"].train_test_split(test_size=0.1, seed=args.subset_seed)
        dsd = DatasetDict(train=split["train"], validation=split["test"])
    if args.max_train_samples:
        dsd["train"] = dsd["train"].shuffle(seed=args.subset_seed).select(range(min(args.max_train_samples, len(dsd["train"]))))
    if args.max_eval_samples:
        dsd["validation"] = dsd["validation"].select(range(min(args.max_eval_samples, len(dsd["validation"]))))
    if label is not None:
        dsd = _normalise_labels(dsd, label)
        names = [n.strip() for n in args.class_names.split(",")] if args.class_names else \
            (list(PACKAGED_LABEL_NAMES) if args.uses_packaged_sample else None)
        if names is not None:
            if len(names) != dsd.num_labels or not all(names):
                raise ValueError(f"--class-names gives {len(names)} name(s) ({', '.join(names)}) but the training "
                                 f"labels define {dsd.num_labels} classes")
            dsd.label_names = names  # type: ignore[attr-defined]
    elif args.class_names:
        raise ValueError("--class-names names the classes of a classification task; language modelling has none")
    return dsd, text, pair, label


def _missing(v) -> bool:
    """An empty label cell: ``None``, NaN, ``""`` or the text ``nan`` (files are read without NA parsing)."""
    if isinstance(v, str):
        return not v.strip() or v.strip().lower() == "nan"
    return v is None or (isinstance(v, float) and math.isnan(v))


def _normalise_labels(dsd: DatasetDict, label: str) -> DatasetDict:
    """Integer labels 0..K-1: contiguous integers as they are; anything else (strings, integers with gaps
    such as 0/1/7, integral floats) mapped by sorted training values, with a log line for integers. A clear
    error for evaluation labels the training data does not have (empty cells are caught earlier)."""
    feat = dsd["train"].features[label]
    if isinstance(feat, ClassLabel):
        names: List = list(feat.names)
        k = len(names)
    else:
        def as_int(v):
            return int(v) if isinstance(v, float) and v.is_integer() else v

        values = sorted({as_int(v) for v in dsd["train"][label]},
                        key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else 0, str(v)))
        fractional = [v for v in values if isinstance(v, float)]
        if fractional:  # 0.5, 1.5: a regression target, not classes
            raise ValueError(f"column {label!r} holds non-integer numbers ({', '.join(map(str, fractional[:3]))}"
                             f"{', ...' if len(fractional) > 3 else ''}): spam-hf trains classifiers; give integer "
                             "or text class labels")
        ints = all(isinstance(v, int) for v in values)
        if ints and values[0] < 0:
            raise ValueError(f"labels must be >= 0; found {values[0]} in column {label!r}")
        if ints and values == list(range(len(values))) and all(isinstance(v, int) for v in dsd["train"][label]):
            k = len(values)
            names = list(range(k))
        else:
            if ints and values != list(range(len(values))):  # 0.0 / 1.0 are 0 / 1, said nothing about
                logger.warning(f"labels {values[:10]} are not 0..{len(values) - 1}: they become classes 0..{len(values) - 1} "
                               "in that order (their names keep the original values)")
            mapping = {v: i for i, v in enumerate(values)}
            for split, ds in dsd.items():
                unknown = sorted({as_int(v) for v in ds[label]} - set(mapping), key=str)
                if unknown:
                    raise ValueError(f"{split} labels out of range: {unknown[:5]} (training labels define "
                                     f"{len(values)} classes: {values[:10]})")
            names, k = values, len(values)
            dsd = dsd.map(lambda b: {"__spam_label": [mapping.get(as_int(v), -1) for v in b[label]]}, batched=True,
                          remove_columns=[label]).rename_column("__spam_label", label)
    for split, ds in dsd.items():
        vals = set(ds[label])
        bad = sorted(v for v in vals if not (isinstance(v, int) and 0 <= v < k))
        if bad:
            raise ValueError(f"{split} labels out of range: {bad[:5]} (training labels define {k} classes: {names[:10]})")
    dsd.num_labels = k  # type: ignore[attr-defined]
    dsd.label_names = [str(n) for n in names]  # type: ignore[attr-defined]
    return dsd


def pack_blocks(dsd: DatasetDict, tokenizer, text: str, block_size: int) -> DatasetDict:
    """Causal-LM inputs: every split's text tokenised, concatenated and cut into blocks of ``block_size``.

    Each block has ``input_ids``, ``attention_mask`` (all ones) and ``labels == input_ids``; the
    remainder shorter than a block is dropped (as in transformers' ``run_clm``).
    """
    def tok(batch):
        return tokenizer(batch[text], add_special_tokens=False)

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = (len(ids) // block_size) * block_size
        blocks = [ids[i:i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    out = {}
    for split, ds in dsd.items():
        enc = ds.map(tok, batched=True, remove_columns=ds.column_names, desc=f"tokenising {split}")
        # one batch per 1,000 lines: the remainder of each batch is dropped, as in run_clm
        out[split] = enc.map(group, batched=True, batch_size=1000, remove_columns=enc.column_names,
                             desc=f"packing {split} into blocks of {block_size}")
        if len(out[split]) == 0:
            raise ValueError(f"the {split} text has fewer than {block_size} tokens: no block to train or evaluate "
                             "on; lower --max-seq-length or give more text")
    res = DatasetDict(out)
    res.num_labels = None  # type: ignore[attr-defined]
    res.label_names = None  # type: ignore[attr-defined]
    return res


def tokenize(dsd: DatasetDict, tokenizer, text: str, pair: Optional[str], label: Optional[str],
             max_length: int) -> DatasetDict:
    """Model inputs (``input_ids``, ``attention_mask``, ``labels``), truncated to ``max_length``; pad in the collator.

    Without a ``label`` column (language modelling) the text is packed with :func:`pack_blocks`.
    """
    if label is None:
        return pack_blocks(dsd, tokenizer, text, max_length)

    def fn(batch):
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        enc["labels"] = batch[label]
        return enc

    out = DatasetDict({split: ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenising {split}")
                       for split, ds in dsd.items()})
    out.num_labels = getattr(dsd, "num_labels", None)  # type: ignore[attr-defined]
    out.label_names = getattr(dsd, "label_names", None)  # type: ignore[attr-defined]
    return out
