"""`visionzoo semisup`: subset sampling, the logistic-regression objective (vs scikit-learn), end to end on digits."""
import argparse
import json

import pytest
import torch

from visionzoo.cli import tools
from visionzoo.evals import semisup


def _parse(argv):
    p = argparse.ArgumentParser()
    tools.semisup(p)
    return p.parse_args(argv)


def test_balanced_subset_is_balanced_and_deterministic():
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 120, 80, 100, 100, 300, 100, 50, 100, 100]))
    idx = semisup.subset_indices(labels, 10, "balanced", seed=3)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.tolist() == [10, 12, 8, 10, 10, 30, 10, 5, 10, 10]
    assert torch.equal(idx, semisup.subset_indices(labels, 10, "balanced", seed=3))
    assert not torch.equal(idx, semisup.subset_indices(labels, 10, "balanced", seed=4))
    assert idx.unique().numel() == idx.numel()
    # 1 % of a 50-image class still keeps one labelled image
    one = semisup.subset_indices(labels, 1, "balanced", seed=0)
    assert (torch.bincount(labels[one], minlength=10) >= 1).all()
    rnd = semisup.subset_indices(labels, 10, "random", seed=0)
    assert rnd.numel() == round(0.1 * labels.numel())
    with pytest.raises(ValueError, match="percent"):
        semisup.subset_indices(labels, 0, "balanced")


def test_separable_features_reach_100():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 4
    ytr, yva = torch.arange(5).repeat(4), torch.arange(5).repeat(40)
    ftr = centers[ytr] + 0.3 * torch.randn(len(ytr), 16, generator=g)
    fva = centers[yva] + 0.3 * torch.randn(len(yva), 16, generator=g)
    rows = semisup.evaluate_lambdas(ftr, ytr, fva, yva, [0.01, 0.1, 1.0])
    assert [r["lambda"] for r in rows] == [0.01, 0.1, 1.0]
    assert all(r["top1"] == 100.0 for r in rows)
    # random features: chance level (the test can fail)
    rows = semisup.evaluate_lambdas(torch.randn(20, 16, generator=g), ytr, fva, yva, [0.1])
    assert rows[0]["top1"] < 60


def test_objective_matches_sklearn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    y = torch.arange(3).repeat(20)
    x = x + 0.5 * torch.nn.functional.one_hot(y, 8)  # overlapping classes: the penalty matters
    x = torch.nn.functional.normalize(x, dim=1)
    lam = 0.1  # the protocol's lambda; divided by n as the official script does
    w, info = semisup.fit_logreg(x, y, lam / len(y), max_iter=1000, tol=1e-9)
    clf = sklearn_lm.LogisticRegression(C=1.0 / lam, fit_intercept=False, tol=1e-10, max_iter=10000)
    clf.fit(x.double().numpy(), y.numpy())
    w_sk = torch.from_numpy(clf.coef_).float()
    obj_sk = float(semisup.logreg_objective(w_sk, x, y, lam / len(y)))
    assert info["objective"] == pytest.approx(obj_sk, rel=1e-5, abs=1e-7)
    assert torch.allclose(w, w_sk, atol=2e-3)
    # a different lambda gives a different optimum (so the mapping is really tested)
    w2, _ = semisup.fit_logreg(x, y, 1.0 / len(y), max_iter=1000, tol=1e-9)
    assert (w2 - w_sk).abs().max() > 0.1


def test_subset_file(tmp_path):
    from visionzoo.data.datasets import DigitsDataset

    ds = DigitsDataset("train", img_size=8)
    names = semisup.sample_names(ds)
    (tmp_path / "sub.txt").write_text(f"{names[5]}\nsome/dir/{names[2]}\n\n")
    assert semisup.subset_from_file(str(tmp_path / "sub.txt"), ds).tolist() == [2, 5]
    (tmp_path / "bad.txt").write_text("n01440764_10026.JPEG\n")
    with pytest.raises(ValueError, match="not in the train split"):
        semisup.subset_from_file(str(tmp_path / "bad.txt"), ds)


def test_cli_end_to_end_digits(tmp_path, capsys):
    torch.set_num_threads(1)
    args = _parse(["--model", "udi_vit_test", "--data", "digits", "--percent", "10", "--workers", "0",
                   "--batch-size", "256", "--out", str(tmp_path), "--lambdas", "0.01", "1"])
    assert semisup.run(args) == 0
    res = json.loads((tmp_path / "semisup.json").read_text())
    assert res["token"] == "cls" and res["n_last_blocks"] == 1
    assert res["classes_in_subset"] == 10 and 130 <= res["num_train"] <= 150  # 10 % of 1437, per class
    assert [r["lambda"] for r in res["results"]] == [0.01, 1]
    assert res["best"]["top1"] == max(r["top1"] for r in res["results"])
    assert res["best"]["top1"] > 20  # random-init ViT features of digits are far above chance (10 %)
    assert (tmp_path / "semisup.csv").is_file()
    assert "best: lambda" in capsys.readouterr().out
