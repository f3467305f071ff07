"""Bad inputs across every subcommand: each ends in a non-zero exit and a short message that names the input and the
fix, never a traceback. (Data-specific cases: tests/test_bad_inputs_data.py.)"""
import pytest
import torch

from visionzoo.cli import main
from visionzoo.testing.unsafe import RunsCodeWhenUnpickled


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken files of every kind a user might pass."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.safetensors").write_bytes(b"\x93not a safetensors file" * 5)
    save_file({"a": torch.zeros(1000)}, str(d / "full.safetensors"))
    (d / "trunc.safetensors").write_bytes((d / "full.safetensors").read_bytes()[:2000])
    torch.save({"a": torch.zeros(1000)}, d / "full.pth")
    (d / "trunc.pth").write_bytes((d / "full.pth").read_bytes()[:1500])
    torch.save({"state_dict": RunsCodeWhenUnpickled(d / "pwned")}, d / "evil.pth")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text('{"architecture": "test_resnet", "num_classes": 10}')
    torch.save({"fc.weight": RunsCodeWhenUnpickled(d / "pwned")}, d / "hf" / "pytorch_model.bin")
    (d / "tag.yaml").write_text("model: !!python/object/apply:os.system ['touch " + str(d / "pwned") + "']\n")
    return d


# (command, words the message must contain); {d} is the folder of broken files
CASES = [
    (["validate", "test_resnet", "--checkpoint", "{d}/garbage.safetensors"], ["garbage.safetensors"]),
    (["validate", "test_resnet", "--checkpoint", "{d}/trunc.safetensors"], ["trunc.safetensors", "truncated"]),
    (["validate", "test_resnet", "--checkpoint", "{d}/trunc.pth"], ["trunc.pth"]),
    (["validate", "{d}/hf"], ["pytorch_model.bin"]),
    (["train", "--recipe", "demo/digits", "-b", "0"], ["batch_size", ">= 1"]),
    (["train", "--recipe", "demo/digits", "--epochs", "0"], ["epochs", ">= 1"]),
    (["train", "--recipe", "demo/digits", "--exp", "../../x"], ["--experiment", "--output"]),
    (["train", "--recipe", "demo/digits", "--num-classes", "0"], ["--num-classes"]),
    (["train", "--recipe", "{d}/tag.yaml"], ["tag.yaml", "python"]),
    (["train", "--recipe", "demo/digits", "--lr", "-1"], ["lr must be >= 0"]),
    (["train", "--recipe", "demo/digits", "--img-size", "0"], ["img_size"]),
    (["linear", "--model", "test_resnet", "--data", "digits", "--lr", "-1"], ["lr_base"]),
    (["train", "--resume", "{d}/evil.pth"], ["evil.pth"]),
    (["pretrain", "--recipe", "udi/pretrain_vit_test_cpu", "-b", "0"], ["batch_size"]),
    (["pretrain", "--recipe", "{d}/tag.yaml"], ["tag.yaml"]),
    (["finetune", "--model", "test_resnet", "--checkpoint", "{d}/trunc.pth", "--epochs", "1"], ["trunc.pth"]),
    (["knn", "--model", "test_resnet", "--data", "digits", "-b", "0"], ["--batch-size", ">= 1"]),
    (["knn", "--model", "test_resnet", "--data", "digits", "--checkpoint", "{d}/garbage.safetensors"],
     ["garbage.safetensors"]),
    (["linear", "--model", "test_resnet", "--data", "digits", "--epochs", "0"], ["--epochs"]),
    (["linear", "--model", "test_resnet", "--data", "{d}/nowhere"], ["nowhere"]),
    (["semisup", "--model", "udi_vit_test", "--data", "digits", "--checkpoint", "{d}/evil.pth"], ["evil.pth"]),
    (["transfer", "--model", "test_resnet", "--datasets", "digits", "--out", "{d}/tr", "-b", "0"], ["--batch-size"]),
    (["videoseg", "eval", "--model", "udi_vit_test", "--data", "{d}/nowhere", "--out", "{d}/v"], ["nowhere"]),
    (["visualize", "attention", "--model", "udi_vit_test", "--checkpoint", "{d}/trunc.safetensors"],
     ["trunc.safetensors"]),
    (["detect", "train", "--recipe", "{d}/tag.yaml"], ["tag.yaml"]),
    (["detect", "eval", "--checkpoint", "{d}/trunc.pth"], ["trunc.pth"]),
    (["segment", "eval", "--checkpoint", "{d}/trunc.pth"], ["trunc.pth"]),
    (["visualize", "groups", "--model", "gpvit_test", "--image", "{d}/garbage.safetensors"], ["garbage.safetensors"]),
    (["segment", "train", "--recipe", "segmentation/semfpn_udi_vit_small_ade20k_40k", "--out", "{d}/s", "--set",
      "model=udi_vit_test", "dataset=shapes", "shapes_train=4", "shapes_val=1"], ["udi_vit_test", "out_indices"]),
    (["pointcloud", "--data", "scanobjectnn:{d}/nowhere"], ["nowhere"]),
    (["pointcloud", "--checkpoint", "{d}/evil.pth", "--data", "shapes"], ["evil.pth"]),
    (["data", "to-lmdb", "{d}/nowhere", "{d}/x.lmdb"], ["nowhere"]),
    (["benchmark", "--model", "test_resnet", "-b", "0"], ["--batch-size"]),
    (["benchmark", "--model", "no_such_model_xyz"], ["no_such_model_xyz"]),
]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_a_bad_input_is_a_short_message_not_a_traceback(argv, words, bad, capsys, one_thread):
    argv = [a.format(d=bad) for a in argv]
    if "train" in argv[:2] or argv[0] in ("pretrain", "finetune", "pointcloud"):
        argv += ["--device", "cpu"]
    if argv[0] == "train" and "--resume" not in argv:
        argv += ["--output", str(bad / "runs")]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    for w in words:
        assert w in err, (w, err)
    assert not (bad / "pwned").exists()


def test_user_errors_are_one_hierarchy():
    """Library code raises visionzoo.errors.UserError (a ValueError) for bad inputs; the CLI prints exactly those."""
    from visionzoo.cli import _is_user_error
    from visionzoo.engine.config import RecipeError
    from visionzoo.engine.loop import NonFiniteLossError
    from visionzoo.engine.state import RunFolderError
    from visionzoo.errors import InputNotFoundError, UserError
    from visionzoo.files import UnsafeCheckpointError
    from visionzoo.models import CheckpointMismatchError, UnknownModelError

    for cls in (RecipeError, NonFiniteLossError, RunFolderError, UnsafeCheckpointError, CheckpointMismatchError,
                UnknownModelError, InputNotFoundError):
        assert issubclass(cls, UserError) and _is_user_error(cls("x")), cls
    assert issubclass(InputNotFoundError, FileNotFoundError)
    assert not _is_user_error(ValueError("a bug deep inside")) and not _is_user_error(KeyError(5))


def test_a_checkpoint_with_another_class_count_is_said_once_and_correctly(tmp_path, caplog):
    import logging

    import visionzoo
    from visionzoo.models._registry import load_weights

    src = visionzoo.create_model("test_resnet", num_classes=7)
    visionzoo.save_pretrained(src, tmp_path / "m")
    model = visionzoo.create_model("test_resnet", num_classes=1000)
    with caplog.at_level(logging.WARNING):
        load_weights(model, tmp_path / "m" / "model.safetensors")
    notes = sorted({r.getMessage() for r in caplog.records if "classifier" in r.getMessage()})
    assert len(notes) == 1 and "for 7 classes" in notes[0] and "for 1000" in notes[0], notes
    assert "has no classifier" not in caplog.text


def test_offline_download_fails_at_once_naming_the_local_ways(monkeypatch):
    """Nothing is fetched unless asked (pretrained=True, hf-hub:); offline, the ask fails without retries."""
    import visionzoo
    from visionzoo.errors import UserError
    from visionzoo.models import _registry

    monkeypatch.setattr(_registry, "hub_reachable", lambda timeout=3.0: False)
    for name, kw in (("resnet10t", {"pretrained": True}), ("hf-hub:timm/resnet10t.c3_in1k", {})):
        with pytest.raises(UserError, match="not reachable") as e:
            visionzoo.create_model(name, **kw)
        assert "checkpoint_path=" in str(e.value) and "local-dir:" in str(e.value)
    with pytest.raises(UserError, match="no weights to download.*checkpoint_path=.*local-dir:"):
        visionzoo.create_model("coc_tiny", pretrained=True)  # ours: nothing to download, whatever the network
    assert visionzoo.create_model("resnet10t").num_classes == 1000  # no download asked: none attempted


def test_a_16bit_label_map_is_refused_not_wrapped(tmp_path):
    import numpy as np
    from PIL import Image

    from visionzoo.dense.segmentation import load_pair
    from visionzoo.errors import UserError

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="a.png: label values 300..300"):
        load_pair(tmp_path / "a.jpg", tmp_path / "a.png")
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "b.png")
    assert load_pair(tmp_path / "a.jpg", tmp_path / "b.png", reduce_zero_label=False)[1].max() == 7
