"""`visionzoo transfer` (end to end, R^2, class angles, checkpoint loading) and the GCR digits study."""
import csv
import os
import re

import numpy as np
import pytest

from visionzoo.cli import main
from visionzoo.data.datasets import write_digits_folder
from visionzoo.evals.transfer import CSV_COLUMNS, class_separation


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


# ----------------------------------------------------------------------------------------------------------------
# angles between classes

import math  # noqa: E402

import torch  # noqa: E402

from visionzoo.evals.transfer import (_model_tags, angle_summary, class_angle_matrix,  # noqa: E402
                                      class_representation, load_frozen_model, principal_angles, vector_angles)


def _rot(deg, a, b, n):
    """Unit vector at ``deg`` degrees from e_a towards e_b in R^n."""
    v = torch.zeros(n, dtype=torch.float64)
    v[a], v[b] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return v


def test_principal_angles_known_subspaces():
    n = 7
    e = torch.eye(n, dtype=torch.float64)
    a = e[:, [0, 1]]
    b = e[:, [2, 3]]  # orthogonal to a
    c = torch.stack([_rot(30, 0, 4, n), _rot(70, 1, 5, n)], 1)  # 30 and 70 degrees from a
    a_mixed = a @ torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)  # same span, not orthonormal
    got = principal_angles(torch.stack([a, b, c, a_mixed]))
    assert got.shape == (4, 4, 2)
    assert torch.allclose(got[0, 1], torch.tensor([90.0, 90.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(got[0, 2], torch.tensor([30.0, 70.0], dtype=torch.float64), atol=1e-6)  # ascending
    assert torch.allclose(got[0, 3], torch.zeros(2, dtype=torch.float64), atol=1e-5)  # basis does not matter
    assert torch.allclose(got[2, 2], torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(got, got.transpose(0, 1), atol=1e-6)


def test_principal_angles_match_scipy_and_chunking():
    from scipy.linalg import subspace_angles

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 9, 2, generator=g, dtype=torch.float64)  # other k: min(3, 2) angles per pair
    got = principal_angles(a, b)
    assert got.shape == (6, 4, 2)
    ref = np.degrees(subspace_angles(a[1].numpy(), b[2].numpy()))[::-1]  # scipy: descending radians
    assert np.allclose(got[1, 2].numpy(), ref, atol=1e-8)
    assert torch.allclose(principal_angles(a, b, max_elems=7), got)  # row chunks give the same


def test_vector_angles_and_angle_matrix():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert torch.allclose(vector_angles(w), torch.tensor([[0.0, 90, 180], [90, 0, 90], [180, 90, 0]],
                                                         dtype=torch.float64), atol=1e-5)
    mat, full = class_angle_matrix(w[:, :, None], "vector")
    assert full.shape == (3, 3, 1) and mat[0, 2] == pytest.approx(180.0)
    n = 6
    e = torch.eye(n, dtype=torch.float64)
    bases = torch.stack([e[:, [0, 1]], torch.stack([_rot(20, 0, 2, n), _rot(50, 1, 3, n)], 1)])
    for stat, want in (("min", 20.0), ("mean", 35.0), ("max", 50.0)):
        mat, _ = class_angle_matrix(bases, "subspace", stat)
        assert mat[0, 1] == pytest.approx(want, abs=1e-6) and mat[0, 0] == 0.0 and mat[1, 1] == 0.0
    summary = angle_summary(np.array([[0.0, 10, 40], [10, 0, 70], [40, 70, 0]]))
    nearest = (10 + 10 + 40) / 3  # each class's closest other class
    want = {"mean_deg": 40.0, "min_deg": 10.0, "max_deg": 70.0, "nearest_mean_deg": nearest}
    assert summary == pytest.approx(want)
    with pytest.raises(ValueError, match="angle stat"):
        class_angle_matrix(bases, "subspace", "median")


def test_class_representation_gcr_softmax_and_file_classifier():
    import timm

    import visionzoo

    gcr = visionzoo.create_model("gcr_test", num_classes=5, dim=3)
    bases, kind = class_representation(gcr)
    assert kind == "subspace" and bases.shape == (5, gcr.num_features, 3)
    assert torch.allclose(bases, gcr.head.subspaces())
    # a GCR weights file loaded without its head: the weight set aside is cut into dim-sized blocks
    bare = visionzoo.create_model("gcr_test", num_classes=0, dim=3)
    bases2, kind2 = class_representation(bare, {"weight": gcr.head.weight})
    assert kind2 == "subspace" and torch.equal(bases2, bases)
    with pytest.raises(ValueError, match="multiple of the model's subspace dim"):
        class_representation(bare, {"weight": gcr.head.weight[:7]})
    soft = timm.create_model("resnet18d", num_classes=4, layers=(1, 1, 1, 1), channels=(8, 16, 24, 32))
    bases3, kind3 = class_representation(soft)
    assert kind3 == "vector" and torch.equal(bases3[..., 0], soft.fc.weight)
    assert class_representation(bare) is None  # no classifier, nothing set aside


def test_load_frozen_model_file_and_folder(tmp_path):
    from safetensors.torch import save_file

    import visionzoo
    from visionzoo.models import save_pretrained

    gcr = visionzoo.create_model("gcr_test", num_classes=5, dim=4).eval()
    save_pretrained(gcr, tmp_path / "run" / "last", data_config={"input_size": (3, 32, 32), "crop_pct": 1.0})
    save_file(gcr.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    feats = gcr.forward_head(gcr.forward_features(x), pre_logits=True)
    # a weights file of a 5-class model loads into the headless model (it used to fail on head.weight)
    model, clf = load_frozen_model("gcr_test", str(tmp_path / "w.safetensors"), {"dim": 4})
    assert set(clf) == {"weight"} and torch.equal(clf["weight"], gcr.head.weight)
    assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), feats)
    # a run directory: rebuilt from its config.json (dim 4, 5 classes, 32x32) with the head
    model, clf = load_frozen_model("gcr_test", str(tmp_path / "run"))
    assert clf == {} and model.dim == 4 and model.num_classes == 5
    assert torch.equal(model.head.weight, gcr.head.weight)
    with pytest.raises(ValueError, match="pass --model gcr_test"):
        load_frozen_model("resnet18d", str(tmp_path / "run"))


def test_transfer_cli_writes_angle_heat_maps(tmp_path):
    import timm

    import visionzoo
    from visionzoo.models import save_pretrained

    root = write_digits_folder(tmp_path / "digits_small", img_size=32, max_per_class=6)
    soft = timm.create_model("resnet18d", num_classes=5, layers=(1, 1, 1, 1), channels=(8, 16, 24, 32))
    save_pretrained(soft, tmp_path / "soft", data_config={"input_size": (3, 32, 32), "crop_pct": 1.0})
    gcr = visionzoo.create_model("gcr_test", num_classes=5, dim=3)
    save_pretrained(gcr, tmp_path / "gcr", data_config={"input_size": (3, 32, 32), "crop_pct": 1.0})
    out = tmp_path / "out"
    rc = main(["transfer", "--model", "resnet18d", "gcr_test", "--checkpoint", str(tmp_path / "soft"),
               str(tmp_path / "gcr"), "--datasets", str(root), "--out", str(out),
               "--device", "cpu", "--classifier", "logreg", "--c-grid", "1", "--angle-stat", "max"])
    assert rc == 0
    with open(out / "principal_angles.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["tag"], r["kind"], r["dim"], r["stat"]) for r in rows] == [
        ("resnet18d", "vector", "1", "vector"), ("gcr_test", "subspace", "3", "max")]
    want, _ = class_angle_matrix(gcr.head.subspaces(), "subspace", "max")
    got = np.loadtxt(out / "principal_angles_gcr_test.csv", delimiter=",")
    assert got.shape == (5, 5) and np.allclose(got, want, atol=1e-3)
    assert np.load(out / "principal_angles_gcr_test.npy").shape == (5, 5, 3)
    for tag in ("resnet18d", "gcr_test"):
        assert os.path.getsize(out / f"principal_angles_{tag}.png") > 1000
    with open(out / "transfer.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert _model_tags(["a", "b", "a"]) == ["a-1", "b", "a-3"]  # a repeated model name gets its position


# ----------------------------------------------------------------------------------------------------------------
# the digits study (visionzoo/studies/gcr_digits.py)

from visionzoo.studies import gcr_digits  # noqa: E402


def test_study_pure_parts():
    assert [gcr_digits.head_dim(h) for h in ("softmax", "gcr1", "gcr8")] == [0, 1, 8]
    with pytest.raises(ValueError, match="unknown head"):
        gcr_digits.head_dim("gcr0")
    x, y = gcr_digits.digits_subset("val", (5, 6, 7, 8, 9))
    assert x.shape == (180, 32, 32) and sorted(set(y.tolist())) == [0, 1, 2, 3, 4] and np.bincount(y).min() == 36
    img = torch.rand(3, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(gcr_digits.random_affine(img, g, scale=(1, 1), degrees=0, shift=0), img, atol=1e-5)
    moved = gcr_digits.random_affine(img, torch.Generator().manual_seed(1))
    assert moved.shape == img.shape and not torch.allclose(moved, img)
    rows = [dict(head="softmax", k=0, **{c: v for c, _, _ in gcr_digits.TABLE}) for v in (1.0, 3.0)]
    s = gcr_digits.summarize(rows, ["softmax", "gcr4"])
    assert len(s) == 1 and s[0]["val_top1"] == 2.0 and s[0]["val_top1_std"] == pytest.approx(math.sqrt(2))
    assert "| softmax | - | 2 | 2.00 ± 1.41 |" in gcr_digits.markdown_table(s)
    cols = {c: 0.0 for c, _, _ in gcr_digits.PAIRED}
    runs = [dict(cols, head="softmax", seed=0, val_top1=90.0), dict(cols, head="softmax", seed=1, val_top1=80.0),
            dict(cols, head="gcr4", seed=0, val_top1=95.0), dict(cols, head="gcr4", seed=1, val_top1=81.0)]
    (d,) = gcr_digits.paired_differences(runs, ["softmax", "gcr4"])
    assert d["head"] == "gcr4" and d["val_top1"] == 3.0 and d["val_top1_std"] == pytest.approx(math.sqrt(8))
    x, y = np.arange(12), np.array([0, 1, 2] * 4)
    xs, ys = gcr_digits.take_per_class(x, y, 2)
    assert np.bincount(ys).tolist() == [2, 2, 2] and np.array_equal(xs, np.sort(xs))


@pytest.mark.slow
def test_study_runs_on_a_tiny_budget(tmp_path):
    out = tmp_path / "study"
    assert gcr_digits.main(["--out", str(out), "--epochs", "3", "--seeds", "0", "--heads", "softmax", "gcr2"]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["head"] for r in rows] == ["softmax", "gcr2"]
    for r in rows:
        assert float(r["val_top1"]) > 20.0 and float(r["transfer_top1"]) > 20.0  # 5 classes: chance is 20%
        assert -1.0 <= float(r["source_r2"]) <= 1.0 and 0.0 < float(r["angle_mean_deg"]) <= 180.0
    assert "| gcr2 | 2 | 1 |" in (out / "results.md").read_text()
    for name in ("transfer_digits_5-9.png", "principal_angles_gcr_test.png", "principal_angles_resnet18d.png"):
        assert (out / "transfer" / name).stat().st_size > 1000
    assert (out / "angles.png").stat().st_size > 1000
    assert re.search(r"\| gcr2 \| 1 \| [+-]\d", (out / "results.md").read_text())  # paired difference to softmax
