"""Write the packaged SST-2 sample (spam_hf/sample_data/) from ../shared/data/sst2: 2,000 random training
rows (seed 0) and the full 872-row GLUE dev set. Run from the repository root."""

import csv
import os
import random

SRC = os.path.join("..", "shared", "data", "sst2")
DST = os.path.join("spam_hf", "sample_data")


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write(path, header, rows):
    # rows are written back verbatim (no quoting, no escaping), exactly as in the source files
    with open(path, "w") as f:
        for row in [header] + rows:
            f.write("\t".join(row) + "\n")


header, train = read(os.path.join(SRC, "train.tsv"))
_, dev = read(os.path.join(SRC, "dev.tsv"))
random.Random(0).shuffle(train)
write(os.path.join(DST, "sst2_sample_train.tsv"), header, train[:2000])
write(os.path.join(DST, "sst2_sample_dev.tsv"), header, dev)
print(f"wrote {2000} train and {len(dev)} dev rows to {DST}")
