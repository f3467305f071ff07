"""`visionzoo transfer`: end to end on a tiny digits ImageFolder, the R^2 metric, and a missing folder."""
import csv
import os

import numpy as np
import pytest

from visionzoo.cli import main
from visionzoo.data.datasets import write_digits_folder
from visionzoo.engine.transfer import CSV_COLUMNS, class_separation


def test_transfer_end_to_end(tmp_path):
    root = write_digits_folder(tmp_path / "digits_small", img_size=32, max_per_class=6)
    out = tmp_path / "out"
    rc = main(["transfer", "--model", "gcr_test", "--datasets", str(root), "--out", str(out),
               "--device", "cpu", "--batch-size", "32", "--classifier", "logreg", "--c-grid", "0.1", "1"])
    assert rc == 0
    with open(out / "transfer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert list(row) == CSV_COLUMNS
    assert row["dataset"] == "digits_small" and int(row["num_classes"]) == 10
    assert int(row["num_train"]) == 60 and int(row["num_val"]) == 60
    assert 0.0 <= float(row["top1"]) <= 100.0
    assert float(row["best_C"]) in (0.1, 1.0)
    assert -1.0 <= float(row["r2"]) <= 1.0
    assert 0.0 <= float(row["intra_class_var"]) <= 2.0
    assert 0.0 <= float(row["variability_deg"]) <= 180.0
    assert os.path.getsize(out / "transfer_digits_small.png") > 1000


def test_r2_separated_beats_random():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    centers = rng.normal(size=(5, 16)) * 5.0
    separated = centers[labels] + rng.normal(size=(200, 16)) * 0.3
    random = rng.normal(size=(200, 16))
    good, bad = class_separation(separated, labels), class_separation(random, labels)
    assert good["r2"] > 0.8 > 0.1 > abs(bad["r2"])
    assert good["intra_class_var"] < bad["intra_class_var"]
    assert good["variability_deg"] < bad["variability_deg"]


def test_r2_matches_pairwise_definition():
    """The closed form equals the spec's definition with explicit pairwise cosine distances."""
    rng = np.random.default_rng(1)
    labels = np.array([0] * 7 + [1] * 4 + [2] * 9)
    x = rng.normal(size=(20, 6)) + labels[:, None]
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    ks = np.unique(labels)
    within = np.mean([d[np.ix_(labels == k, labels == k)].mean() for k in ks])
    total = np.mean([d[np.ix_(labels == j, labels == k)].mean() for j in ks for k in ks])
    got = class_separation(x, labels, center=False)
    assert got["r2"] == pytest.approx(1 - within / total, abs=1e-10)
    assert got["intra_class_var"] == pytest.approx(within, abs=1e-10)


def test_missing_dataset_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    rc = main(["transfer", "--model", "gcr_test", "--datasets", str(missing), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
