"""visionzoo.dense.backbones: every kind of model as a dense backbone (shapes, strides, gradients, weights)."""
import pytest
import torch

import visionzoo
from visionzoo.dense.backbones import SimplePyramid, build_backbone

CASES = [  # model, neck, strides, channels
    ("coc_test", "auto", [4, 8, 16, 32], [16, 24, 32, 40]),
    ("gpvit_test", "native", [8, 8, 8], [24, 24, 24]),
    ("gpvit_test", "simple", [4, 8, 16, 32], [24] * 4),
    ("cswin_test", "auto", [4, 8, 16, 32], [8, 16, 32, 64]),
    ("udi_vit_test", "auto", [4, 8, 16, 32], [32] * 4),
    ("resnet18", "native", [4, 8, 16, 32], [64, 128, 256, 512]),
]


@pytest.mark.parametrize("name,neck,strides,chans", CASES)
def test_shapes_strides_and_gradients(one_thread, name, neck, strides, chans):
    torch.manual_seed(0)
    bb = build_backbone(name, neck=neck).train()
    assert bb.strides == strides and bb.out_channels == chans
    assert bb.size_divisor % 32 == 0 or bb.size_divisor % max(strides) == 0
    x = torch.randn(2, 3, 50, 70)  # not a multiple of anything: padded to the size divisor
    maps = bb(x)
    d = bb.size_divisor
    H, W = -(-50 // d) * d, -(-70 // d) * d
    assert [tuple(m.shape) for m in maps] == [(2, c, H // s, W // s) for c, s in zip(chans, strides)]
    sum(m.square().mean() for m in maps).backward()
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_vit_dense_ignores_class_tokens_and_runs_any_size(one_thread):
    torch.manual_seed(0)
    bb = build_backbone("udi_vit_test").eval()
    vit = bb.maps.vit
    assert not vit.cls_token.requires_grad and not vit.reg_token.requires_grad
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = bb(x)
        vit.cls_token.add_(5.0)
        vit.reg_token.add_(5.0)
        b = bb(x)
    for m, n in zip(a, b):
        torch.testing.assert_close(m, n)
    # patch 4: the stride-4 level is the patch grid of the input itself (64x96 / 4), pos_embed resampled to it
    assert a[0].shape[-2:] == (16, 24)


def test_simple_pyramid_generalises_to_the_stride():
    p8 = SimplePyramid(4, in_stride=8)
    assert [type(m).__name__ for m in p8.ops] == ["Sequential", "Identity", "MaxPool2d", "MaxPool2d"]
    p16 = SimplePyramid(4, in_stride=16)
    kinds = [type(m).__name__ for m in p16.ops[0]]
    assert kinds == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]  # UDI fpn1
    maps = p16([torch.randn(1, 4, 4, 4)] * 4)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


def test_checkpoint_loads_and_classifier_is_dropped(one_thread, tmp_path):
    torch.manual_seed(0)
    clf = visionzoo.create_model("coc_test", num_classes=7)
    path = tmp_path / "coc.pth"
    torch.save({"state_dict": clf.state_dict()}, path)
    bb = build_backbone("coc_test", checkpoint=str(path))
    body = bb.body.state_dict()
    ref = clf.state_dict()
    shared = [k for k in body if k in ref]
    assert len(shared) > 10 and not any(k.startswith("head") for k in body)
    for k in shared:
        torch.testing.assert_close(body[k], ref[k])


def test_clear_errors():
    with pytest.raises(ValueError, match="neck"):
        build_backbone("coc_test", neck="bogus")
    with pytest.raises(ValueError, match="simple"):
        build_backbone("udi_vit_test", neck="native")
    with pytest.raises(ValueError, match="native"):
        build_backbone("resnet18", neck="simple")
    with pytest.raises(FileNotFoundError):
        build_backbone("coc_test", checkpoint="/nonexistent/weights.pth")
