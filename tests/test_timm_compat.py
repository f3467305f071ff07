"""timm compatibility beyond our own sweep: torch.fx feature extraction, timm's factory arguments, and timm's own
``tests/test_models.py`` run on our models (``.ci/timm_tests.py``; the full run is ``-m slow``)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionzoo  # noqa: F401  (registers our models)

REPO = Path(__file__).resolve().parents[1]
# one small model per family
FAMILY_MODELS = ["coc_test", "cswin_test", "gpvit_test", "ga_test", "gcr_test", "udi_vit_test"]


def _tracer_kwargs():
    from timm.models import get_notrace_functions, get_notrace_modules

    # what timm's FX feature wrapper and its tests pass: our shape-dependent modules / functions are registered
    # with timm's notrace registries and stay leaves of the traced graph
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_create_feature_extractor(name):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    kw = _tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=kw)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        expected = model(x)
        got = list(fx(x).values())[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the traced train-mode graph runs backward and reaches every parameter
    fx.train()
    out = list(fx(x).values())[0]
    out.float().mean().backward()
    no_grad = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient through the FX graph for {no_grad[:5]}"


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_factory_device_dtype(name):
    """timm's ``device=`` / ``dtype=`` factory arguments: built directly on the meta device / in bfloat16."""
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors if t.is_floating_point())
    model.reset_classifier(3)  # a rebuilt classifier follows the model's device and dtype
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.get_classifier().parameters())
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)


def _timm_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / ".ci" / "timm_tests.py"), *args],
                          cwd=REPO, capture_output=True, text=True)


def test_timm_suite_fast_subset():
    """timm's own FX and config tests on the ``*_test`` variants (the sdist is downloaded once and cached)."""
    proc = _timm_suite("--kinds", "default_cfgs,forward_fx,backward_fx", "--models", "*_test",
                       "--", "-q", "-p", "no:warnings")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.slow
def test_timm_suite_all_models():
    """Every kind of timm's test_models.py that we target, on every visionzoo model in timm's registry (~20-30 min
    on 2 CPU cores); no known failures (docs/timm_tests.md has the counts)."""
    proc = _timm_suite("--", "-q", "-p", "no:warnings", *os.environ.get("VISIONZOO_TIMM_PYTEST_ARGS", "").split())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_dense_coc_names_are_fork_feat_forms_of_the_base_models(tmp_path):
    """``coc_{small,medium}_feat{2,5,7}`` are not timm names (their stage norms only feed the dense maps, so timm's
    classifier tests would find parameters without a gradient): visionzoo builds them as ``coc_small`` /
    ``coc_medium`` with ``fork_feat=True`` and p x p centers, and folders saved from them load again."""
    from visionzoo.dense.backbones import build_backbone

    assert not timm.is_model("coc_small_feat5") and visionzoo.models.is_model("coc_small_feat5")
    assert "coc_small_feat5" not in visionzoo.list_models()  # older names: loadable, not listed
    with torch.device("meta"):
        old = visionzoo.create_model("coc_small_feat5")
        base = timm.create_model("coc_small", fork_feat=True, proposals=5, num_classes=0)
    assert old.pretrained_cfg["architecture"] == "coc_small_feat5" and old.num_classes == 0
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert old.proposals == base.proposals == [(5, 5)] * 4
    bb = build_backbone("coc_small_feat5")
    assert bb.strides == [4, 8, 16, 32] and bb.out_channels == [64, 128, 320, 512]

    torch.manual_seed(0)
    model = visionzoo.create_model("coc_small_feat2").eval()
    visionzoo.save_pretrained(model, tmp_path / "saved")
    loaded = visionzoo.load_pretrained(tmp_path / "saved").eval()
    assert loaded.pretrained_cfg["architecture"] == "coc_small_feat2" and loaded.fork_feat
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True),
                        loaded.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_point_cloud_model_is_visionzoo_only(capsys):
    """``coc_pointmlp`` takes ``[B, 3, N]`` point clouds: kept out of timm's image-model registry, still listed and
    built by visionzoo (what the point-cloud task uses)."""
    from visionzoo.cli import main

    assert not timm.is_model("coc_pointmlp") and "coc_pointmlp" not in timm.list_models("coc_*")
    assert "coc_pointmlp" in visionzoo.list_models() and "coc_pointmlp" in visionzoo.list_models("coc_p*")
    assert main(["list", "models"]) == 0
    assert "coc_pointmlp" in capsys.readouterr().out.split()
    model = visionzoo.create_model("coc_pointmlp", points=128, k_neighbors=(8, 8, 8, 8), num_classes=4).eval()
    assert model.pretrained_cfg["architecture"] == "coc_pointmlp" and model.pretrained_cfg["num_classes"] == 4
    with torch.no_grad():
        assert model(torch.randn(2, 3, 128)).shape == (2, 4)
    with pytest.raises(visionzoo.models.UnknownModelError, match="coc_pointmlp"):
        visionzoo.create_model("coc_pointmpl")  # a typo names the close match
