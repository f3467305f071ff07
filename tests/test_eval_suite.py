"""The evaluation suite: k-NN, linear probe, fine-tuning (evals/features, knn, linear; tasks/finetune) for any model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.evals.features import extract, knn_classify, model_features, resolve_token


def _brute_force_knn(train, ytr, test, yte, k, T, C):
    """Per-sample loops in numpy: the weighted vote written out plainly."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for x, y in zip(te, yte):
        sim = tr @ x
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        scores = np.zeros(C)
        for j in nn_idx:
            scores[ytr[j]] += np.exp(sim[j] / T)
        order = np.argsort(-scores, kind="stable")
        top1 += order[0] == y
        top5 += y in order[:5]
    return 100.0 * top1 / len(yte), 100.0 * top5 / len(yte)


def test_knn_classify_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    C = 7
    centers = torch.randn(C, 16, generator=g)
    ytr = torch.randint(0, C, (300,), generator=g)
    yte = torch.randint(0, C, (90,), generator=g)
    train = centers[ytr] + 0.8 * torch.randn(300, 16, generator=g)
    test = centers[yte] + 0.8 * torch.randn(90, 16, generator=g)
    res = knn_classify(train, ytr, test, yte, ks=(1, 10, 20, 100), T=0.07, num_classes=C, chunk=32)
    for k in (1, 10, 20, 100):
        t1, t5 = _brute_force_knn(train.numpy(), ytr.numpy(), test.numpy(), yte.numpy(), k, 0.07, C)
        assert res[k]["top1"] == pytest.approx(t1) and res[k]["top5"] == pytest.approx(t5), k
    assert res[10]["top1"] > 60  # separable clusters: far above chance (14%)
    # k larger than the memory bank is clipped to it
    small = knn_classify(train[:8], ytr[:8], test, yte, ks=(200,), num_classes=C)
    assert list(small) == [8]


def test_token_features_of_a_two_token_vit():
    m = visionzoo.create_model("udi_vit_test", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = m.forward_features(x)
        assert resolve_token(m, "auto") == "cls"
        torch.testing.assert_close(model_features(m, x, "cls"), tokens[:, 0])
        torch.testing.assert_close(model_features(m, x, "cls+"), tokens[:, 1])
        torch.testing.assert_close(model_features(m, x, "both"), tokens[:, :2].flatten(1))
        # last 2 blocks, each through the final norm, plus the mean patch token of the last block
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        outs = []
        for blk in m.blocks:
            h = blk(h)
            outs.append(m.norm(h))
        want = torch.cat([outs[-2][:, 0], outs[-1][:, 0], outs[-1][:, 2:].mean(1)], dim=1)
        got = model_features(m, x, "cls", n_last_blocks=2, avgpool_patchtokens=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pooled_features_and_clear_token_errors():
    cnn = visionzoo.create_model("resnet10t", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    assert resolve_token(cnn, "auto") == "pooled"
    with torch.no_grad():
        torch.testing.assert_close(model_features(cnn, x, "pooled"), cnn(x))
    with pytest.raises(ValueError, match="needs a class token.*--token pooled"):
        resolve_token(cnn, "cls")
    vit = visionzoo.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match=r"second class token \[CLS\+\]"):
        resolve_token(vit, "cls+")
    with pytest.raises(ValueError, match="unknown token"):
        resolve_token(vit, "mean")


def test_extract_keeps_model_mode_and_order():
    m = visionzoo.create_model("udi_vit_test", num_classes=0).train()
    xs = torch.randn(5, 3, 32, 32)
    loader = [(xs[:3], torch.tensor([0, 1, 2])), (xs[3:], torch.tensor([3, 4]))]
    f, y = extract(m, loader, "cpu", token="cls")
    assert m.training and f.shape == (5, 32) and y.tolist() == [0, 1, 2, 3, 4]
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(f, m.forward_features(xs)[:, 0])


def test_knn_cli_writes_table(tmp_path, capsys):
    out = tmp_path / "knn"
    assert main(["knn", "--model", "udi_vit_test", "--data", "digits", "--workers", "0", "--device", "cpu",
                 "-k", "10", "20", "--token", "both", "--out", str(out)]) == 0
    assert "20-NN  top-1" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "knn.csv")))
    assert [r["k"] for r in rows] == ["10", "20"] and all(r["token"] == "both" for r in rows)
    summary = json.load(open(out / "knn.json"))
    assert summary["num_train"] == 1437 and summary["num_val"] == 360 and summary["feature_dim"] == 64
    # even random features of digits beat chance (10%) clearly with a k-NN
    assert all(float(r["top1"]) > 20 for r in rows)


def test_knn_cli_bad_input(tmp_path, capsys):
    assert main(["knn", "--model", "resnet10t", "--data", str(tmp_path / "missing")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["knn", "--model", "resnet10t", "--data", "digits", "--token", "cls+", "--workers", "0"]) == 2
    assert "Use --token pooled" in capsys.readouterr().err
    assert main(["knn", "--data", "digits", "--checkpoint", str(tmp_path)]) == 2
    assert "is a folder without" in capsys.readouterr().err


def test_linear_probe_learns_on_cached_features(tmp_path, capsys):
    out = tmp_path / "lin"
    torch.manual_seed(0)
    assert main(["linear", "--model", "resnet10t", "--data", "digits", "--workers", "0", "--device", "cpu",
                 "--augment", "none", "--epochs", "15", "--lr", "0.2", "--batch-size", "64", "--batchnorm",
                 "--out", str(out)]) == 0
    assert "lr 0.05 = lr_base 0.2 x 64/256" in capsys.readouterr().out  # the engine's header
    log = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(log) == 15
    summary = json.load(open(out / "summary.json"))
    assert summary["best_top1"] > 60, summary  # chance is 10%
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])
    head = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "best" / "model.safetensors"))
    assert head["1.weight"].shape == (10, 512) and "0.running_mean" in head
    # a second probe into the same folder is refused; --resume of a finished run changes nothing
    assert main(["linear", "--model", "resnet10t", "--data", "digits", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_linear_probe_resume_is_exact(tmp_path):
    args = ["linear", "--model", "resnet10t", "--data", "digits", "--workers", "0", "--device", "cpu",
            "--augment", "none", "--epochs", "3", "--lr", "0.2", "--batch-size", "64", "--img-size", "32"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    from visionzoo.tasks.linear_probe import LinearProbeConfig, linear_probe

    cfg = LinearProbeConfig(model="resnet10t", data="digits", workers=0, augment="none", epochs=3, lr_base=0.2,
                            batch_size=64, img_size=32, output=str(tmp_path), experiment="part", max_steps=30)
    linear_probe(cfg, device="cpu")
    assert main(args + ["--resume", str(tmp_path / "part")]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("ref", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in r.items() if not k.endswith(("_time_s", "img_per_sec"))}
             for r in csv.DictReader(open(tmp_path / name / "metrics.csv"))] for name in ("ref", "part")]
    assert rows[0] == rows[1]


def test_linear_probe_with_augmentation_and_last_blocks(tmp_path):
    assert main(["linear", "--model", "udi_vit_test", "--data", "digits", "--workers", "0", "--device", "cpu",
                 "--augment", "simple", "--hflip", "0", "--epochs", "1", "--n-last-blocks", "2",
                 "--avgpool-patchtokens", "--out", str(tmp_path / "run")]) == 0
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["n_last_blocks"] == 2 and summary["feature_dim"] == 3 * 32


def _save_backbone(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    backbone = visionzoo.create_model("udi_vit_test", num_classes=0)
    run = tmp_path / "pretrain_run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(run / "teacher_backbone.safetensors"))
    return backbone, run


def test_finetune_loads_backbone_and_scales_new_head(tmp_path, capsys):
    backbone, run = _save_backbone(tmp_path)
    rc = main(["finetune", "--recipe", "udi/finetune_vit_test_cpu", "--checkpoint", str(run), "--lr", "0",
               "--head-init-scale", "0.001", "--warmup-epochs", "0", "--epochs", "1", "--max-steps", "2", "--output", str(tmp_path / "runs"),
               "--exp", "ft", "--device", "cpu"])
    assert rc == 0
    assert "fine-tuned udi_vit_test" in capsys.readouterr().out
    from safetensors.torch import load_file

    tuned = load_file(str(tmp_path / "runs" / "ft" / "last" / "model.safetensors"))
    # lr 0 (the cosine floor min_lr 1e-6 still moves weights by ~1e-9): the backbone is the checkpoint
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert tuned["head.weight"].shape == (10, 32)
    assert 0 < tuned["head.weight"].abs().max() < 1e-3  # timm's init x 0.001


def test_finetune_any_model_trains_and_errors(tmp_path, capsys):
    # a CNN fine-tuned from backbone-only weights (no classifier in the file): a new head is made and trained
    from safetensors.torch import save_file

    torch.manual_seed(2)
    cnn = visionzoo.create_model("resnet10t", num_classes=0)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / "resnet10t.safetensors"))
    rc = main(["finetune", "--recipe", "udi/finetune_vit_test_cpu", "--model", "resnet10t", "--checkpoint",
               str(tmp_path / "resnet10t.safetensors"), "--epochs", "2", "--output", str(tmp_path / "runs"),
               "--exp", "ft2", "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ft2" / "metrics.csv")))
    assert float(rows[-1]["val_top1"]) > 50, rows  # chance is 10%
    _, run = _save_backbone(tmp_path)
    assert main(["finetune", "--checkpoint", str(tmp_path / "nothing.pth"), "--model", "udi_vit_test"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["finetune", "--recipe", "udi/pretrain_vit_test_cpu", "--checkpoint", str(run)]) == 2
    assert "pretraining recipe" in capsys.readouterr().err


def test_every_shipped_recipe_loads_into_its_config():
    from visionzoo.engine.config import find_recipe, is_pretrain_recipe, list_recipes, load_config
    from visionzoo.ssl.udi import UDIConfig

    names = list_recipes()
    assert any(n.startswith("udi/pretrain_") for n in names) and "udi/finetune_vit_small_1gpu" in names
    for name in names:
        if is_pretrain_recipe(find_recipe(name)):
            cfg = UDIConfig.from_yaml(name)
            assert cfg.epochs > 0, name
        elif name.startswith("pointcloud/"):
            from visionzoo.dense.pointcloud import PointCloudConfig

            assert PointCloudConfig.from_yaml(str(find_recipe(name))).epochs > 0, name
            with pytest.raises(ValueError, match="point-cloud recipe"):
                load_config(name)
        elif name.startswith(("detection/", "segmentation/")):
            from visionzoo.dense.detection import DetectionConfig
            from visionzoo.dense.segmentation import SegmentationConfig

            task_cfg = DetectionConfig if name.startswith("detection/") else SegmentationConfig
            assert task_cfg.from_yaml(str(find_recipe(name))).lr > 0, name
            with pytest.raises(ValueError, match=f"{name.split('/')[0]} recipe"):
                load_config(name)
        else:
            cfg = load_config(name)
            assert cfg.global_batch(cfg.world_size) > 0, name


def test_udi_digits_pretraining_never_sees_val_images():
    from visionzoo.ssl.udi import UDIConfig, _build_data

    cfg = UDIConfig.from_dict(dict(model="udi_vit_test", dataset="digits", global_size=32, local_size=16))
    ssl_set, knn_train, knn_val, num_classes = _build_data(cfg, 4)
    assert (len(ssl_set), len(knn_train), len(knn_val), num_classes) == (1437, 1437, 360, 10)
    train_ids = set(ssl_set.base.indices.tolist())
    assert not train_ids & set(knn_val.indices.tolist())


def test_load_model_from_train_run_and_pretrain_run_folders(tmp_path):
    """A `visionzoo train` run folder resolves to its best/ model, rebuilt with the arguments in its config.json
    (here global_pool='avg', whose fc_norm keys a plain udi_vit_test lacks); a `visionzoo pretrain` run folder,
    whose config.json names no architecture, needs --model and says so."""
    from visionzoo.evals.knn import load_model
    from visionzoo.models import resolve_checkpoint

    torch.manual_seed(3)
    trained = visionzoo.create_model("udi_vit_test", num_classes=0, global_pool="avg")
    run = tmp_path / "train_run"
    visionzoo.save_pretrained(trained, run / "best", model_args={"global_pool": "avg"})
    assert resolve_checkpoint(str(run)) == run / "best" / "model.safetensors"
    x = torch.randn(2, 3, 32, 32)
    for name in (None, "udi_vit_test"):
        model = load_model(name, str(run)).eval()
        assert model.global_pool == "avg"
        torch.testing.assert_close(model(x), trained.eval()(x))
    _, pretrain_run = _save_backbone(tmp_path)
    (pretrain_run / "config.json").write_text(json.dumps({"model": "udi_vit_test", "epochs": 1}))
    with pytest.raises(ValueError, match="--model is needed"):
        load_model(None, str(pretrain_run))
    assert load_model("udi_vit_test", str(pretrain_run)).num_features == 32
