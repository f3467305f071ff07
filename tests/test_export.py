"""`visionzoo export`: each family's tiny model to ONNX (run by onnxruntime) and to a .pt2 program, checked against
eager; weights from a checkpoint keep their classifier; features_only; a dynamic batch really is dynamic. The full-size
sweep over every registered image model is `slow` (docs/export.md has its table)."""
import pytest
import timm
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.export import VERIFY_RTOL, export, run_exported
from visionzoo.models import list_models

pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install 'visionzoo[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported files")



def _is_image_model(name: str) -> bool:  # the point-cloud model is not in timm's registry and takes points
    cfg = timm.get_pretrained_cfg(name)
    return cfg is not None and len(cfg.input_size or ()) == 3


TINY = [m for m in list_models("*_test") if _is_image_model(m)]
SLOW_TINY = {"cswin_test"}  # the slowest capture (~4x the others): the backbone of GA-CSWin, not a family of its own
TINY = [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_TINY else m for m in TINY]


def _check_against_eager(model, fmt, path, batch):
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        ref = model(x)
    ref = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    got = run_exported(fmt, path, x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert (g - r).abs().max() <= VERIFY_RTOL * r.abs().max() + 1e-6


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_exports_to_onnx_with_a_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    result = export(name, fmt="onnx", output=str(tmp_path / f"{name}.onnx"), dynamic_batch=True)
    assert result["max_rel_error"] <= VERIFY_RTOL
    torch.manual_seed(0)  # the same weights as the exported model
    # the file's batch is symbolic: another batch size than the one exported runs and matches eager
    _check_against_eager(visionzoo.create_model(name).eval(), "onnx", tmp_path / f"{name}.onnx", batch=5)


def test_onnx_with_a_static_batch_refuses_another_batch(tmp_path):
    import onnxruntime

    export("coc_test", fmt="onnx", output=str(tmp_path / "m.onnx"), batch_size=2)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        session.run(None, {session.get_inputs()[0].name: torch.randn(3, 3, 32, 32).numpy()})


def test_cli_exports_a_trained_checkpoint_with_its_classifier(tmp_path, capsys):
    """A 7-class checkpoint of a 10-class default model: the export keeps the checkpoint's classifier and weights."""
    trained = visionzoo.create_model("gpvit_test", num_classes=7).eval()
    visionzoo.save_pretrained(trained, tmp_path / "saved")
    out = tmp_path / "m.pt2"
    assert main(["export", "gpvit_test", "--checkpoint", str(tmp_path / "saved"), "--format", "exported-program",
                 "-o", str(out)]) == 0
    assert "verified: torch.export.load" in capsys.readouterr().out
    _check_against_eager(trained, "exported-program", out, batch=2)
    # the save_pretrained folder itself names the model too
    assert main(["export", str(tmp_path / "saved"), "-o", str(tmp_path / "folder.onnx")]) == 0
    _check_against_eager(trained, "onnx", tmp_path / "folder.onnx", batch=2)


def test_features_only_exports_every_level(tmp_path):
    torch.manual_seed(0)
    export("coc_test", fmt="onnx", output=str(tmp_path / "f.onnx"), features_only=True)
    torch.manual_seed(0)
    feats = visionzoo.create_model("coc_test", features_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    got = run_exported("onnx", tmp_path / "f.onnx", x)
    with torch.no_grad():
        ref = feats(x)
    assert len(got) == len(ref) == len(feats.feature_info)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["export", "coc_test", "--format", "exported-program", "-o", "m.onnx"], "is a .pt2 file"),
    (["export", "coc_tset"], "coc_test"),
    (["export", "coc_test", "--checkpoint", "missing.safetensors"], "not found"),
])
def test_bad_export_inputs_end_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


FULL = [m for m in list_models() if not m.endswith("_test") and _is_image_model(m)]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_model_exports_to_onnx(name, tmp_path):
    result = export(name, fmt="onnx", output=str(tmp_path / f"{name}.onnx"), batch_size=1)
    assert result["max_rel_error"] <= VERIFY_RTOL
