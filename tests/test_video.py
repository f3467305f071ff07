"""`visionzoo videoseg`: J / F metrics, label propagation, the embedded DAVIS-layout videos, the CLI."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

from visionzoo.cli import tools
from visionzoo.dense import video


def _parse(argv):
    p = argparse.ArgumentParser()
    tools.videoseg(p)
    return p.parse_args(argv)


def _square(h=20, w=20, r0=5, r1=15, c0=5, c1=15):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ----------------------------------------------------------------------------------------------------------------
# metrics

def test_j_and_f_identity_and_empty():
    gt = np.stack([_square(), _square(r0=2, r1=9)])
    empty = np.zeros_like(gt)
    assert torch.allclose(video.region_j(gt, gt), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(video.boundary_f(gt, gt), torch.ones(2, dtype=torch.float64))
    assert torch.equal(video.region_j(empty, gt), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(video.boundary_f(empty, gt), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(video.boundary_f(gt, empty), torch.zeros(2, dtype=torch.float64))
    # both empty: a perfect (absent) object, as davis2017 scores it
    assert video.region_j(empty, empty).tolist() == [1.0, 1.0]
    assert video.boundary_f(empty, empty).tolist() == [1.0, 1.0]


def test_j_and_f_hand_case():
    gt = _square()  # 10 x 10 square in a 20 x 20 image
    # J: a 10 x 10 square shifted by 5 columns overlaps half: 50 / 150
    assert float(video.region_j(_square(c0=10, c1=20)[None], gt[None])[0]) == pytest.approx(1 / 3)
    # boundary of the square: inner right column (10) + inner bottom row (9) + outer top row (11) + outer left
    # column (10) = 40 pixels (davis2017's _seg2bmap marks changes towards east / south / south-east)
    assert int(video.seg_to_boundary(gt[None]).sum()) == 40
    # an extra one-pixel blob far away adds 4 unmatched boundary pixels: precision 40/44, recall 1
    pred = gt.copy()
    pred[1, 18] = True
    f = float(video.boundary_f(pred[None], gt[None])[0])  # tolerance ceil(0.008 * 28.3) = 1 pixel
    assert f == pytest.approx(2 * (40 / 44) / (40 / 44 + 1))
    assert float(video.region_j(pred[None], gt[None])[0]) == pytest.approx(100 / 101)
    # a one-pixel shift is within the 1-pixel tolerance: F = 1, J < 1
    shifted = _square(c0=6, c1=16)
    assert float(video.boundary_f(shifted[None], gt[None])[0]) == 1.0
    assert float(video.region_j(shifted[None], gt[None])[0]) == pytest.approx(90 / 110)


def _f_reference(fg, gt, bound_th=0.008):
    """davis2017 f_measure written out with numpy/scipy, one frame (independent check of the torch version)."""
    from scipy.ndimage import binary_dilation

    def bmap(seg):
        e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
        e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
        b = seg ^ e | seg ^ s | seg ^ se
        b[-1, :], b[:, -1] = seg[-1, :] ^ e[-1, :], seg[:, -1] ^ s[:, -1]
        b[-1, -1] = 0
        return b

    r = int(bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(fg.shape)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = yy ** 2 + xx ** 2 <= r ** 2
    fb, gb = bmap(fg), bmap(gt)
    fd, gd = binary_dilation(fb, disk), binary_dilation(gb, disk)
    n_fg, n_gt = fb.sum(), gb.sum()
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0
    p, rc = (fb & gd).sum() / n_fg, (gb & fd).sum() / n_gt
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_boundary_f_matches_reference_on_random_masks():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    H, W = 60, 200  # diagonal 209 -> 2-pixel tolerance
    gt = np.stack([np.roll(_square(H, W, 10, 40, 30, 90), s, axis=1) for s in range(0, 40, 5)])
    pred = gt ^ (rng.random(gt.shape) < 0.05)  # noisy boundaries and speckles
    pred[3] = np.roll(gt[3], 7, axis=0)
    ours = video.boundary_f(pred, gt).numpy()
    ref = np.array([_f_reference(p, g) for p, g in zip(pred, gt)])
    assert np.allclose(ours, ref)
    assert ours.min() < 0.9  # the case is not trivial
    # a DAVIS-sized tolerance (8 pixels at 854x480), given in pixels
    ours8 = video.boundary_f(pred, gt, bound_th=8).numpy()
    assert np.allclose(ours8, [_f_reference(p, g, bound_th=8) for p, g in zip(pred, gt)])
    assert (ours8 >= ours).all() and not np.allclose(ours8, ours)


def test_statistics_and_score_sequence():
    st = video.statistics(np.array([1.0, 1.0, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0]))
    assert st["M"] == pytest.approx(0.325) and st["R"] == pytest.approx(0.25)
    assert st["D"] > 0.5  # decays over time
    gt = np.zeros((5, 20, 20), dtype=np.uint8)
    gt[:, 5:15, 5:15] = 1
    gt[:, 0:3, 0:3] = 2
    pred = gt.copy()
    pred[2][pred[2] == 2] = 0  # object 2 lost in the middle frame
    objs = video.score_sequence(gt, pred)
    assert [o["object"] for o in objs] == [1, 2]
    assert len(objs[0]["J"]) == 3  # first and last frames are not scored
    assert np.allclose(objs[0]["J"], 1) and np.allclose(objs[0]["F"], 1)
    assert objs[1]["J"].tolist() == [1.0, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------
# propagation

def test_neighbourhood_mask():
    m = video.neighbourhood_mask(5, 6, 1)
    assert m.shape == (30, 30) and torch.equal(m, m.T)
    assert int(m[0].sum()) == 4 and int(m[2 * 6 + 2].sum()) == 9  # corner 2x2, interior 3x3
    assert bool(m[0, 7]) and not bool(m[0, 2])
    assert bool(video.neighbourhood_mask(3, 3, 0).all())


def test_propagate_oracle_features_keep_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (8, 8), generator=g).reshape(-1)
    feats = torch.nn.functional.one_hot(labels, 3).float()  # oracle: the feature is the label
    seg = torch.nn.functional.one_hot(labels, 3).T.float()
    out = video.propagate(feats, feats[None], seg[None], video.neighbourhood_mask(8, 8, 2), topk=5)
    assert torch.equal(out.argmax(0), labels)
    assert torch.allclose(out.sum(0), torch.ones(64))
    # uninformative features: labels are mixed, not copied
    out = video.propagate(torch.ones(64, 3) / 3 ** 0.5, (torch.ones(64, 3) / 3 ** 0.5)[None], seg[None], topk=64)
    assert torch.allclose(out, seg.mean(1, keepdim=True).expand(-1, 64))


class _ColourOracle(torch.nn.Module):
    """A 'ViT' whose patch feature is the one-hot index of the nearest reference colour (patch 4, 1 class token)."""

    def __init__(self, colours):
        super().__init__()
        self.register_buffer("colours", torch.tensor(colours, dtype=torch.float32))
        self.patch_embed = torch.nn.Module()
        self.patch_embed.patch_size = (4, 4)
        self.num_prefix_tokens = 1
        self.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def forward_features(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # [B, N, 3]
        idx = torch.cdist(mean, self.colours[None]).argmin(-1)
        onehot = torch.nn.functional.one_hot(idx, len(self.colours)).float()
        return torch.cat([torch.zeros_like(onehot[:, :1]), onehot], dim=1)


def test_static_scene_is_reproduced(tmp_path):
    from PIL import Image

    colours = [(0.1, 0.1, 0.8), (0.9, 0.2, 0.1), (0.2, 0.9, 0.2)]
    lab = np.zeros((32, 48), dtype=np.uint8)
    lab[4:16, 8:24], lab[20:28, 28:44] = 1, 2  # aligned to the 4-pixel patches
    img = (np.array(colours)[lab] * 255).astype(np.uint8)
    seq = tmp_path / "JPEGImages" / "480p" / "static"
    ann = tmp_path / "Annotations" / "480p" / "static"
    seq.mkdir(parents=True)
    ann.mkdir(parents=True)
    for t in range(6):
        Image.fromarray(img).save(seq / f"{t:05d}.jpg", quality=95)
        video.write_indexed_png(ann / f"{t:05d}.png", lab, video.davis_palette())
    model = _ColourOracle(colours)
    frames, anns = video.sequence_files(tmp_path, "static")
    preds = video.segment_sequence(model, frames, anns[0], tmp_path / "out" / "static", short_side=0,
                                   size_multiple=4, radius=3)
    # exact up to the 4 corner pixels of each rectangle, which DINO's bilinear upsampling of the patch-level label
    # maps rounds off (0.625^2 < 0.5 object weight there)
    wrong = preds != lab[None]
    assert not wrong[0].any() and (wrong.sum((1, 2))[1:] == 8).all()
    corners = {(4, 8), (4, 23), (15, 8), (15, 23), (20, 28), (20, 43), (27, 28), (27, 43)}
    assert {tuple(p) for p in np.argwhere(wrong[1])} == corners
    summary = video.score_folder(tmp_path, tmp_path / "out", ["static"])
    assert summary["global"]["JF_mean"] > 0.98 and summary["global"]["F_mean"] == 1.0


def test_patch_features_drop_every_prefix_token():
    from timm.models.vision_transformer import VisionTransformer

    x = torch.randn(2, 3, 48, 64)
    udi = video.load_vit("udi_vit_test", None)  # [CLS] + [CLS+]
    dino = VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                             dynamic_img_size=True)  # one class token
    regs = VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                             reg_tokens=3, dynamic_img_size=True)
    for model, n_prefix in ((udi, 2), (dino, 1), (regs, 4)):
        with torch.no_grad():
            f = video.patch_features(model.eval(), x)
            tokens = model.forward_features(x)
        assert f.shape == (2, 12 * 16, model.embed_dim) and tokens.shape[1] == 12 * 16 + n_prefix
        assert torch.allclose(f, torch.nn.functional.normalize(tokens[:, n_prefix:], dim=-1))


# ----------------------------------------------------------------------------------------------------------------
# data and CLI

def test_embedded_videos_are_deterministic_davis_layout(tmp_path):
    a = video.write_davis(tmp_path / "a", n_sequences=2, n_frames=4, size=(48, 64), seed=3)
    b = video.write_davis(tmp_path / "b", n_sequences=2, n_frames=4, size=(48, 64), seed=3)
    names = (a / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == video.list_sequences(a)
    for n in names:
        for t in range(4):
            la, pal = video.read_indexed_png(a / "Annotations" / "480p" / n / f"{t:05d}.png")
            lb, _ = video.read_indexed_png(b / "Annotations" / "480p" / n / f"{t:05d}.png")
            assert np.array_equal(la, lb) and la.max() >= 1
            assert (a / "JPEGImages" / "480p" / n / f"{t:05d}.jpg").read_bytes() == \
                   (b / "JPEGImages" / "480p" / n / f"{t:05d}.jpg").read_bytes()
        assert tuple(pal[1]) == (128, 0, 0)  # DAVIS palette
    frames, labels = video.render_video(1, 6, (48, 64))
    assert frames.shape == (6, 48, 64, 3) and labels.shape == (6, 48, 64)
    assert not np.array_equal(labels[0], labels[-1])  # objects move


def test_texture_style_is_deterministic_and_colour_blind(tmp_path):
    """``style="texture"``: same frames from the same seed, objects move, and object and background pixels have the
    same colour statistics (so colour cannot separate them), unlike the default style."""
    fa, la = video.render_video(5, 6, (48, 64), style="texture")
    fb, lb = video.render_video(5, 6, (48, 64), style="texture")
    assert np.array_equal(fa, fb) and np.array_equal(la, lb)
    assert not np.array_equal(la[0], la[-1]) and la[0].max() >= 1
    assert not np.array_equal(fa, video.render_video(6, 6, (48, 64), style="texture")[0])

    def gap(frames, labels):  # largest per-channel |mean| and |std| difference, in units of the pixel std
        obj, bg = frames[labels > 0].astype(np.float64), frames[labels == 0].astype(np.float64)
        scale = frames.reshape(-1, 3).std(0)
        return max(np.abs(obj.mean(0) - bg.mean(0)).max() / scale.max(),
                   np.abs(obj.std(0) - bg.std(0)).max() / scale.max())

    for seed in range(3):
        assert gap(*video.render_video(seed, 6, (48, 64), style="texture")) < 0.05
    assert max(gap(*video.render_video(seed, 6, (48, 64))) for seed in range(3)) > 0.3  # the check can fail
    root = video.write_davis(tmp_path / "t", n_sequences=1, n_frames=3, size=(48, 64), seed=2, style="texture")
    assert video.list_sequences(root) == ["texture_val_000"]
    with pytest.raises(ValueError, match="texture"):
        video.render_video(0, 2, (48, 64), style="stripes")
    args = _parse(["make-data", str(tmp_path / "m"), "--style", "texture", "--sequences-count", "1"])
    assert args.style == "texture"


def test_lighting_style_relights_each_frame_and_keeps_the_scene(tmp_path):
    """``style="lighting"``: the default-style scene (same labels) with its own brightness / contrast / saturation /
    hue per frame, deterministic; make-data --image-folder copies the frames into a pretraining image folder."""
    fa, la = video.render_video(3, 6, (48, 64), style="lighting")
    fb, lb = video.render_video(3, 6, (48, 64), style="lighting")
    shapes, ls = video.render_video(3, 6, (48, 64))
    assert np.array_equal(fa, fb) and np.array_equal(la, lb) and np.array_equal(la, ls)
    assert not np.array_equal(fa, shapes)

    def frame_to_frame(frames):  # how much the mean colour of the background moves from frame to frame
        means = np.stack([f[l == 0].mean(0) for f, l in zip(frames.astype(np.float64), ls)])
        return np.abs(np.diff(means, axis=0)).mean()

    assert frame_to_frame(fa) > 4 * frame_to_frame(shapes)
    root = tmp_path / "d"
    assert video.run(_parse(["make-data", str(root), "--style", "lighting", "--sequences-count", "2", "--frames",
                             "6", "--size", "32", "48", "--image-folder", str(tmp_path / "img")])) == 0
    train, val = (sorted((tmp_path / "img" / s / "frames").glob("*.jpg")) for s in ("train", "val"))
    assert len(train) + len(val) == 12 and len(val) == 1
    assert train[0].name == "lighting_val_000_00001.jpg" and val[0].name == "lighting_val_000_00000.jpg"


def test_cli_end_to_end_shapes(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    args = _parse(["eval", "--model", "udi_vit_test", "--data", "shapes", "--out", str(out), "--device", "cpu"])
    assert video.run(args) == 0
    res = json.loads((out / "videoseg.json").read_text())
    seqs = video.list_sequences(out / "data")
    assert set(res["per_sequence"]) == set(seqs) and len(seqs) == 4
    pngs = sorted((out / seqs[0]).glob("*.png"))
    assert len(pngs) == 16 and video.read_indexed_png(pngs[5])[0].shape == (96, 128)
    g = res["global"]
    assert 0 < g["JF_mean"] <= 1 and g["JF_mean"] == pytest.approx((g["J_mean"] + g["F_mean"]) / 2)
    assert "J&F-Mean" in capsys.readouterr().out
    # `score` re-reads the PNGs and gives the same numbers
    assert video.run(_parse(["score", "--data", str(out / "data"), "--results", str(out),
                             "--out", str(tmp_path / "s")])) == 0
    again = json.loads((tmp_path / "s" / "videoseg.json").read_text())
    assert again["global"]["JF_mean"] == pytest.approx(g["JF_mean"])
    with pytest.raises(FileNotFoundError, match="DAVIS-2017 root"):
        video.run(_parse(["eval", "--model", "udi_vit_test", "--data", str(tmp_path), "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="needs a ViT"):
        video.load_vit("resnet18", None)


@pytest.mark.slow
def test_pretrained_checkpoint_runs_end_to_end(tmp_path):
    """The learning-check pipeline, shortened: UDI-pretrain udi_vit_test on frames of the procedural videos, then
    propagate with the run folder as --checkpoint (numbers of the full run: docs/dense/udi_evals.md)."""
    from visionzoo.cli import main

    torch.set_num_threads(1)
    assert main(["videoseg", "make-data", str(tmp_path / "davis_train"), "--sequences-count", "4", "--frames", "8",
                 "--size", "48", "64", "--seed", "1", "--split", "train",
                 "--image-folder", str(tmp_path / "frames")]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "udi/pretrain_vit_test_video_cpu", "--data-dir", str(tmp_path / "frames"),
                 "--output", str(run), "--epochs", "1", "--batch-size", "16", "--workers", "0",
                 "--no-progress"]) == 0
    out = tmp_path / "eval"
    args = _parse(["eval", "--model", "udi_vit_test", "--checkpoint", str(run), "--data", "shapes", "--out", str(out),
                   "--data-style", "lighting", "--short-side", "48", "--size-multiple", "16", "--device", "cpu"])
    assert video.run(args) == 0
    res = json.loads((out / "videoseg.json").read_text())
    assert res["checkpoint"] == str(run) and 0 < res["global"]["JF_mean"] <= 1


@pytest.mark.slow
def test_udi_pretraining_beats_random_init_under_lighting_changes(tmp_path):
    """The learning check of docs/dense/udi_evals.md at half the schedule (40 epochs, about 5 minutes): UDI features
    propagate the masks through the relit videos clearly better than the same ViT at random init."""
    from visionzoo.cli import main

    torch.set_num_threads(1)
    assert main(["videoseg", "make-data", str(tmp_path / "train"), "--sequences-count", "96", "--frames", "8",
                 "--seed", "1", "--split", "train", "--image-folder", str(tmp_path / "frames")]) == 0
    run = tmp_path / "udi"
    assert main(["pretrain", "--recipe", "udi/pretrain_vit_test_video_cpu", "--data-dir", str(tmp_path / "frames"),
                 "--output", str(run), "--epochs", "40", "--workers", "1", "--no-progress"]) == 0
    val = video.write_davis(tmp_path / "light", n_sequences=24, seed=0, style="lighting")
    scores = {}
    for name, checkpoint in (("random", None), ("udi", str(run))):
        model = video.load_vit("udi_vit_test", checkpoint, seed=0)
        summary = video.evaluate(model, val, video.list_sequences(val), str(tmp_path / name), short_side=0,
                                 size_multiple=16)
        scores[name] = summary["global"]["JF_mean"]
    assert scores["udi"] > scores["random"] + 0.03, scores  # full run: 0.591 vs 0.514
