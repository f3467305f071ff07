"""`visualize clusters`: small inputs drawn readable, the input size of the checkpoint, and the animation over a run's
snapshots (a synthetic run folder: coc_test weights of three "epochs")."""
import numpy as np
import pytest
import torch
from PIL import Image

import visionzoo
from visionzoo.cli import main
from visionzoo.engine.state import RunFolder
from visionzoo.models import save_pretrained
from visionzoo.viz.common import MIN_DISPLAY_SIDE, display_zoom, upsample_map


@pytest.fixture
def digit(tmp_path):
    rng = np.random.RandomState(0)
    path = tmp_path / "digit.png"
    Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _run_folder(tmp_path, epochs=(0, 1, 2), input_size=32):
    """What `visionzoo train --model coc_test --save-every-epochs 1 --save-init-snapshot` leaves: last/ (the
    architecture and preprocessing) and one weights file per epoch."""
    run = tmp_path / "run"
    model = visionzoo.create_model("coc_test")
    save_pretrained(model, run / "last", data_config={"input_size": (3, input_size, input_size), "crop_pct": 1.0,
                                                      "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    folder = RunFolder(run)
    for e in epochs:
        torch.manual_seed(e)
        folder.save_snapshot(visionzoo.create_model("coc_test").state_dict(), epoch=e, step=22 * e)
    return run


def test_small_input_is_drawn_large_and_pixel_exact(tmp_path, digit, capsys):
    out = tmp_path / "map.png"
    assert main(["visualize", "clusters", "--model", "coc_test", "--image", str(digit), "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape[:2] == (256, 256)  # 32 px zoomed x8, not a 32x32 thumbnail
    assert "drawn at 256x256" in capsys.readouterr().out
    assert display_zoom(32, 32) * 32 >= MIN_DISPLAY_SIDE and display_zoom(480, 640) == 1
    # each map cell covers its own block of pixels, also when the sizes do not divide
    up = upsample_map(np.arange(6).reshape(2, 3), 5, 7)
    assert up.shape == (5, 7) and up[0, 0] == 0 and up[-1, -1] == 5 and set(np.unique(up)) == set(range(6))


def test_input_size_and_architecture_come_from_the_checkpoint(tmp_path, digit, capsys):
    run = _run_folder(tmp_path, input_size=64)
    out = tmp_path / "map.png"
    assert main(["visualize", "clusters", "--checkpoint", str(run), "--image", str(digit), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "model input 64x64" in said and "16x16 (WxH) map" in said
    assert main(["visualize", "clusters", "--model", "coc_tiny", "--checkpoint", str(run), "--image", str(digit),
                 "--out", str(out)]) == 2
    assert "holds a coc_test" in capsys.readouterr().err


def test_animate_writes_one_frame_per_snapshot_with_its_epoch(tmp_path, digit, capsys):
    run = _run_folder(tmp_path)
    gif = tmp_path / "clusters.gif"
    assert main(["visualize", "clusters", "--checkpoint", str(run), "--animate", "--image", str(digit),
                 "--stage", "0", "--block", "0", "--head", "1", "--out", str(gif)]) == 0
    assert "3 frames, epochs 0, 1, 2" in capsys.readouterr().out
    im = Image.open(gif)
    assert im.format == "GIF" and im.n_frames == 3
    W, H = im.size
    assert W == 256 and H > 256  # the 256x256 map and the caption band below it
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")))
    assert not np.array_equal(frames[0][:256], frames[2][:256])  # other weights, other clusters
    assert not np.array_equal(frames[0][256:], frames[1][256:])  # the caption says another epoch


def test_animate_needs_snapshots_and_names_the_fix(tmp_path, digit, capsys):
    run = _run_folder(tmp_path, epochs=())
    assert main(["visualize", "clusters", "--checkpoint", str(run), "--animate", "--image", str(digit)]) == 2
    assert "--save-every-epochs" in capsys.readouterr().err
    assert main(["visualize", "clusters", "--model", "coc_test", "--animate", "--image", str(digit)]) == 2
    assert "--checkpoint RUN" in capsys.readouterr().err


def test_mp4_without_imageio_ffmpeg_names_the_package(tmp_path, digit, capsys):
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        pytest.skip("imageio-ffmpeg is installed: the MP4 is written")
    run = _run_folder(tmp_path, epochs=(0, 1))
    assert main(["visualize", "clusters", "--checkpoint", str(run), "--animate", "--image", str(digit),
                 "--out", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert "imageio-ffmpeg" in err and "a.gif" in err
