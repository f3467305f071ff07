"""`visualize attention`: the recomputed [CLS]/[CLS+] attention equals what the ViT's own last block computes."""
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.viz.attention import cls_attention, mass_threshold


def _reference_probs(model, x):
    """Attention probabilities of the last block, captured from timm's unfused path (softmax -> attn_drop)."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return seen[0]  # (B, heads, N, N)


def test_cls_and_cls_plus_attention_match_the_model():
    torch.manual_seed(0)
    model = visionzoo.create_model("udi_vit_test").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _reference_probs(model, x)
    p = model.num_prefix_tokens
    for token, idx in (("cls", 0), ("cls+", 1)):
        got = cls_attention(model, x, token)
        ph, pw = model.patch_embed.patch_size
        assert got.shape == (2, ref.shape[1], 32 // ph, 32 // pw)
        torch.testing.assert_close(got.flatten(2), ref[:, :, idx, p:])


def test_mass_threshold_keeps_the_smallest_set_holding_the_mass():
    maps = torch.tensor([[[0.5, 0.2], [0.2, 0.1]]])
    kept = mass_threshold(maps, 0.6)
    assert kept.sum() == 2 and kept[0, 0, 0] and (kept[0, 0, 1] or kept[0, 1, 0]) and not kept[0, 1, 1]
    assert mass_threshold(maps, 0.5).sum() == 1
    assert mass_threshold(maps, 0.95).sum() == 4


def test_cli_writes_png_and_rejects_cls_plus_on_a_plain_vit(tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["visualize", "attention", "--model", "udi_vit_test", "--token", "cls+", "--threshold", "0.6",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["visualize", "attention", "--model", "vit_tiny_patch16_224", "--token", "cls+",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "two class tokens" in capsys.readouterr().err
