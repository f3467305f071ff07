"""GCR recipes: every official config loads and builds its optimizer; the CPU recipe trains, keeps the class subspaces
orthonormal, and resumes exactly with the composite (Euclidean + Riemannian) optimizer."""
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.engine.config import RECIPES_DIR, TrainConfig, load_config
from visionzoo.tasks.classify import build_model, build_optimizer, train

GCR_DIR = RECIPES_DIR / "gcr"
NAMES = sorted(p.stem for p in GCR_DIR.glob("*.yaml"))
OFFICIAL = sorted(n for n in NAMES if not n.endswith(("_1gpu", "_cpu")))
# geometry lr = lr * lr_factor (spec gcr.md section 3): 0.1 for RSGD and RAdamW, 0.3 for RLamb
GEO_LR = {"gcr_sgd": 0.1, "gcr_adamw": 0.1, "gcr_lamb": 0.3}


def recipe(name: str, **overrides) -> TrainConfig:
    return load_config(f"gcr/{name}", overrides or None)


def test_the_27_official_configs_and_their_1gpu_forms_are_there():
    assert len(OFFICIAL) == 27  # 17 GCR configs + 10 vector baselines (manifest.json)
    assert sum("_gcr" in n for n in OFFICIAL) == 17
    assert set(NAMES) == set(OFFICIAL) | {n + "_1gpu" for n in OFFICIAL} | {"gcr_digits_cpu"}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_and_names_a_registered_model(name):
    cfg = recipe(name)
    assert timm.is_model(cfg.model), f"{name}: model {cfg.model} is not registered"
    assert cfg.notes.strip()
    if "_gcr" in name:
        assert cfg.model in visionzoo.list_models(), f"{name}: {cfg.model} is not a visionzoo model"
        assert cfg.opt.startswith("gcr_") and "lr_factor" in cfg.opt_kwargs
        assert cfg.lr * cfg.opt_kwargs["lr_factor"] == pytest.approx(GEO_LR[cfg.opt])
        assert cfg.loss == "ce"  # GCR logits are bounded in [0, gamma]: softmax CE / LS, never BCE
    elif name != "gcr_digits_cpu":
        assert not cfg.opt.startswith("gcr_") and "lr_factor" not in cfg.opt_kwargs


@pytest.mark.parametrize("name", OFFICIAL)
def test_1gpu_form_keeps_global_batch_and_lr(name):
    multi = yaml.safe_load((GCR_DIR / f"{name}.yaml").read_text())
    one = yaml.safe_load((GCR_DIR / f"{name}_1gpu.yaml").read_text())
    a, b = TrainConfig(**multi), TrainConfig(**one)
    assert b.world_size == 1
    assert a.global_batch(a.world_size) == b.global_batch(1)
    assert a.resolved_lr(a.world_size) == b.resolved_lr(1)
    diff = {k for k in set(multi) | set(one) if multi.get(k) != one.get(k)}
    assert diff <= {"world_size", "grad_accum_steps", "notes"}, diff


def test_official_numbers_spot_checks():
    a1 = recipe("resnet50d_8xb256_rsb_a1_600e_in1k_gcr8")
    assert (a1.epochs, a1.global_batch(a1.world_size), a1.opt_kwargs["lr_factor"], a1.smoothing) == (600, 2048, 60.0, 0.1)
    a3 = recipe("resnet50d_8xb256_rsb_a3_100e_in1k_gcr8_fixres")
    assert (a3.img_size, a3.lr, a3.opt_kwargs["lr_factor"], a3.smoothing) == (176, 8e-3, 37.5, 0.1)
    swin = recipe("swin_tiny_8xb128_in1k_gcr8")
    assert (swin.clip_grad, swin.global_batch(swin.world_size), swin.opt_kwargs["lr_factor"]) == (5.0, 1024, 100.0)
    deit = recipe("deit3_small_p16_8xb256_in1k_224px_gcr8")
    assert (deit.epochs, deit.opt_kwargs["lr_factor"], deit.loss) == (800, 75.0, "ce")
    assert recipe("deit3_small_p16_8xb256_in1k_224px").loss == "bce"
    sgd = recipe("resnet50d_8xb32_coslr_in1k_gcr16")
    assert (sgd.model, sgd.global_batch(sgd.world_size), sgd.lr, sgd.weight_decay) == ("resnet50d_gcr16", 256, 0.1, 1e-4)
    assert sgd.opt_kwargs["filter_bias_and_bn"] is False  # official RSGD decays BN/bias too


def test_recipes_build_their_model_and_optimizer():
    """Every distinct model of the 27 configs, built full size on the meta device by the engine (model_kwargs,
    drop_path, drop applied), with its recipe's optimizer; GCR ones get the composite optimizer."""
    from visionzoo.optim.grassmann import GrassmannOptimizer

    seen = set()
    for name in OFFICIAL:
        cfg = recipe(name)
        key = (cfg.model, cfg.opt, str(cfg.model_kwargs), cfg.drop_path, cfg.drop)
        if key in seen:
            continue
        seen.add(key)
        with torch.device("meta"):
            model = build_model(cfg, cfg.num_classes)
        opt = build_optimizer(cfg, model, cfg.lr)
        n_all = sum(p.numel() for p in model.parameters())
        if not cfg.opt.startswith("gcr_"):
            assert not isinstance(opt, GrassmannOptimizer)
            assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_all
            continue
        assert isinstance(opt, GrassmannOptimizer), name
        geo = [g for g in opt.param_groups if g.get("grassmann")]
        assert len(geo) == 1 and geo[0]["lr_factor"] == cfg.opt_kwargs["lr_factor"] and geo[0]["weight_decay"] == 0.0
        n_geo = sum(p.numel() for p in geo[0]["params"])
        assert n_geo == cfg.num_classes * geo[0]["subspace_dim"] * model.head.in_features
        euclid = sum(p.numel() for g in opt.param_groups if not g.get("grassmann") for p in g["params"])
        assert euclid + n_geo == n_all
    assert len({k[0] for k in seen}) == 18  # 11 GCR models (resnet50d_gcr8: SGD and LAMB) + 7 timm baselines


# ----------------------------------------------------------------------------------------------------------------
# the CPU recipe through the engine

def cpu_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output=str(tmp_path), workers=0, log_interval=1000)
    base.update(kw)
    return recipe("gcr_digits_cpu", **base)


def head_weight(run_dir) -> torch.Tensor:
    sd = load_file(str(Path(run_dir) / "last" / "model.safetensors"))
    return sd["head.weight"]


def assert_orthonormal(w: torch.Tensor, num_classes: int, atol: float = 1e-5) -> None:
    p = w.double().reshape(num_classes, -1, w.shape[-1])  # (K, k, n): each class block has orthonormal rows
    gram = p @ p.transpose(1, 2)
    eye = torch.eye(p.shape[1], dtype=gram.dtype).expand_as(gram)
    assert float((gram - eye).abs().max()) < atol


def test_cpu_recipe_trains_and_keeps_subspaces_orthonormal(tmp_path):
    torch.set_num_threads(1)
    cfg = cpu_cfg(tmp_path, experiment="smoke", max_steps=12)
    assert (cfg.dataset, cfg.img_size, cfg.amp, cfg.model) == ("digits", 32, "fp32", "gcr_test")
    out = train(cfg)
    assert out["global_step"] == 12
    w = head_weight(out["run_dir"])
    assert w.shape[0] == 10 * 2  # 10 classes x k=2
    assert_orthonormal(w, 10)
    state = torch.load(Path(out["run_dir"]) / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["optimizer"]["grassmann"]["counter"] == 12  # one subspace update per step


def test_resume_with_the_composite_optimizer_is_exact(tmp_path):
    torch.set_num_threads(1)
    n = 7  # QR every 5 updates: resumes between two re-orthonormalisations, so the saved counter matters
    # epochs=1: the cosine lr changes every step, and the geometry lr follows it
    full = train(cpu_cfg(tmp_path, experiment="full", epochs=1, max_steps=2 * n))
    part = train(cpu_cfg(tmp_path, experiment="part", epochs=1, max_steps=n))
    w_part = head_weight(part["run_dir"])
    resumed = train(cpu_cfg(tmp_path, max_steps=2 * n), resume=part["run_dir"])
    assert part["global_step"] == n and resumed["global_step"] == full["global_step"] == 2 * n
    a = load_file(str(Path(full["run_dir"]) / "last" / "model.safetensors"))
    b = load_file(str(Path(part["run_dir"]) / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    # the comparison is meaningful: the subspaces moved between step n and step 2n
    assert float((a["head.weight"] - w_part).abs().max()) > 1e-4
    assert_orthonormal(a["head.weight"], 10)
