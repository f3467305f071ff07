"""The model contract: names, errors, weight files, HF-layout folders."""
import json

import pytest
import timm
import torch

import visionzoo
from visionzoo.models import CheckpointMismatchError, UnknownModelError, load_weights, read_state_dict

TINY = "test_resnet"  # a tiny timm model: the contract holds for timm's models too


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError) as e:
        visionzoo.create_model("resnet5O")
    assert "resnet50" in str(e.value)


def test_save_pretrained_roundtrip_and_timm_local_dir(tmp_path):
    torch.manual_seed(0)
    model = visionzoo.create_model(TINY, num_classes=4).eval()
    folder = visionzoo.save_pretrained(model, tmp_path / "m", data_config={"input_size": (3, 64, 64), "crop_pct": 1.0})
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == TINY and cfg["num_classes"] == 4
    assert (folder / "model.safetensors").exists()
    x = torch.randn(2, 3, 64, 64)
    again = visionzoo.load_pretrained(folder).eval()
    assert again.pretrained_cfg["input_size"] == (3, 64, 64) or list(again.pretrained_cfg["input_size"]) == [3, 64, 64]
    viatimm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        torch.testing.assert_close(viatimm(x), model(x))


def test_checkpoint_path_file_and_wrappers(tmp_path):
    model = visionzoo.create_model(TINY, num_classes=3)
    sd = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    other = visionzoo.create_model(TINY, num_classes=3, checkpoint_path=tmp_path / "ckpt.pth")
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == set(sd)


def test_other_num_classes_drops_the_classifier(tmp_path):
    model = visionzoo.create_model(TINY, num_classes=3)
    visionzoo.save_pretrained(model, tmp_path / "m")
    other = visionzoo.create_model(TINY, num_classes=5, checkpoint_path=tmp_path / "m")
    assert other.num_classes == 5


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    visionzoo.save_pretrained(visionzoo.create_model("test_vit"), tmp_path / "vit")
    with pytest.raises(CheckpointMismatchError) as e:
        visionzoo.create_model(TINY, checkpoint_path=tmp_path / "vit")
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "another architecture" in msg


def test_missing_checkpoint_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        visionzoo.create_model(TINY, checkpoint_path=tmp_path / "nope.safetensors")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="bad.pth"):
        load_weights(visionzoo.create_model(TINY), bad)
