"""The detector parts, as mmdet 2.x computes them, on torchvision's modules where those compute the same thing.

One builder per part, used by the detectors (``model.py``) and by the official-module parity
(``official.py``, which translates mmdet constructor arguments into these builders' arguments):

* ``build_fpn``: torchvision ``FeaturePyramidNetwork`` (lateral 1x1 + output 3x3 convs, nearest top-down resize to
  the lower level's size, optional norm and no activation: mmdet's FPN), with mmdet's extra levels:
  ``MaxPoolLevels`` (``max_pool2d(k=1, s=2)`` of the last output, repeated) or ``ExtraConvs`` (stride-2 3x3
  convs on the last output or the last input, chained, ReLU between them only with ``relu_before_extra_convs``;
  torchvision's ``LastLevelP6P7`` always puts a ReLU before P7).
* ``MMDetAnchorGenerator``: mmdet's ``AnchorGenerator`` (center_offset 0): base anchors are NOT rounded
  (torchvision rounds them to integers) and each level uses its configured stride (torchvision derives it as
  image size // map size, which is wrong for P6/P7 of images that are not multiples of 64/128).
* ``build_rpn_head`` / ``build_retina_head``: torchvision's ``RPNHead`` / ``RetinaNetHead`` (conv + ReLU towers), with
  other widths and depths where mmdet's arguments ask for them.
* ``build_box_head`` + ``MMDetBoxPredictor``, ``build_mask_head`` + ``MMDetMaskPredictor``: torchvision's
  ``TwoMLPHead`` / ``FastRCNNConvFCHead`` / ``MaskRCNNHeads`` and mmdet-sized predictors: K + 1 class scores but
  only K boxes and K masks (torchvision also predicts a box and a mask for the background; RoIHeads never read them,
  so a zero background box / mask is put in front and torchvision's RoIHeads run unchanged).
* ``MMDetRetinaNet``: K sigmoid logits (mmdet), not K + 1; labels stay 1..K outside the model.
* ``predictions_in_fp32``: the heads' outputs as fp32 for the losses and post-processing (mmdet's ``force_fp32``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from ...errors import UserError

NORMS = {None: None, "bn": nn.BatchNorm2d, "gn": partial(nn.GroupNorm, 32)}
EXTRA_LEVELS = ("maxpool", "on_output", "on_input")


def norm_layer(name: str | None) -> Callable[..., nn.Module] | None:
    if name not in NORMS:
        raise UserError(f"unknown norm {name!r}: use one of {', '.join(str(k) for k in NORMS)}")
    return NORMS[name]


# ----------------------------------------------------------------------------------------------------------------
# FPN

class MaxPoolLevels(ExtraFPNBlock):
    """mmdet FPN without extra convs: each extra level is ``max_pool2d(last, kernel 1, stride 2)``."""

    def __init__(self, num: int = 1):
        super().__init__()
        self.num = num

    def forward(self, results, x, names):
        for _ in range(self.num):
            results.append(nn.functional.max_pool2d(results[-1], 1, 2, 0))
            names.append(str(len(names)))
        return results, names


class ExtraConvs(ExtraFPNBlock):
    """mmdet FPN ``add_extra_convs``: 3x3 stride-2 convs (with the FPN's norm, no activation), the first on the last
    FPN output (``on_output``) or the last backbone map (``on_input``), each next one on the previous result."""

    def __init__(self, num: int, channels: int, in_channels: int | None = None, on_input: bool = False,
                 norm: Callable[..., nn.Module] | None = None, relu_before_extra_convs: bool = False):
        super().__init__()
        self.on_input = on_input
        self.relu_before = relu_before_extra_convs
        first = in_channels if on_input else channels
        self.convs = nn.ModuleList([
            Conv2dNormActivation(first if i == 0 else channels, channels, 3, 2, norm_layer=norm,
                                 activation_layer=None) for i in range(num)])

    def forward(self, results, x, names):
        src = x[-1] if self.on_input else results[-1]
        for i, conv in enumerate(self.convs):
            if i and self.relu_before:
                src = nn.functional.relu(src)
            src = conv(src)
            results.append(src)
            names.append(str(len(names)))
        return results, names


def build_fpn(in_channels: Sequence[int], out_channels: int, num_outs: int, extra: str = "maxpool",
              norm: str | None = None, relu_before_extra_convs: bool = False) -> FeaturePyramidNetwork:
    """mmdet's FPN on the given backbone maps: ``num_outs`` outputs, the ones past the inputs made by ``extra``."""
    if extra not in EXTRA_LEVELS:
        raise UserError(f"FPN extra levels must be one of {EXTRA_LEVELS}, got {extra!r}")
    n_extra = num_outs - len(in_channels)
    if n_extra < 0:
        raise UserError(f"FPN num_outs {num_outs} is below its {len(in_channels)} inputs")
    nl = norm_layer(norm)
    if extra == "maxpool":
        block = MaxPoolLevels(n_extra) if n_extra else None
    else:
        block = ExtraConvs(n_extra, out_channels, in_channels[-1], extra == "on_input", nl, relu_before_extra_convs)
    return FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=block, norm_layer=nl)


# ----------------------------------------------------------------------------------------------------------------
# anchors

class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet 2.x anchors: per level, sizes x ratios (ratio-major, as torchvision) centred at ``stride * (x, y)``."""

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int]):
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(self.sizes):
            raise UserError(f"{len(self.sizes)} anchor levels but {len(strides)} strides")
        self.strides = [int(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = ratios.sqrt()
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # not rounded (torchvision rounds)

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


def anchor_generator(strides: Sequence[int], scales: Sequence[float], ratios: Sequence[float] = (0.5, 1.0, 2.0)):
    """Anchors of side ``scale * stride`` for each scale, at every level (mmdet ``scales`` / octave scales)."""
    return MMDetAnchorGenerator(tuple(tuple(float(k * s) for k in scales) for s in strides),
                                (tuple(float(r) for r in ratios),) * len(strides), strides)


# ----------------------------------------------------------------------------------------------------------------
# dense heads

def build_rpn_head(in_channels: int, num_anchors: int, feat_channels: int | None = None) -> RPNHead:
    """mmdet RPNHead (3x3 conv + ReLU, 1x1 objectness per anchor (sigmoid), 1x1 deltas): torchvision's RPNHead."""
    head = RPNHead(in_channels, num_anchors)
    feat = feat_channels or in_channels
    if feat != in_channels:  # torchvision's head keeps the input width
        head.conv = nn.Sequential(Conv2dNormActivation(in_channels, feat, 3, norm_layer=None))
        head.cls_logits = nn.Conv2d(feat, num_anchors, 1)
        head.bbox_pred = nn.Conv2d(feat, 4 * num_anchors, 1)
        for m in (head.conv[0][0], head.cls_logits, head.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return head


def build_retina_head(in_channels: int, num_anchors: int, num_classes: int, feat_channels: int | None = None,
                      stacked_convs: int = 4, norm: str | None = None, norm_groups: int = 32) -> RetinaNetHead:
    """mmdet RetinaHead: per branch ``stacked_convs`` 3x3 conv (+ norm) + ReLU, then a 3x3 conv to A*K logits
    (``num_classes`` = K foreground classes, sigmoid) / A*4 deltas: torchvision's RetinaNetHead. ``norm_groups``:
    the groups of a ``gn`` norm (torchvision's retinanet_v2 head uses 16)."""
    nl = partial(nn.GroupNorm, norm_groups) if norm == "gn" else norm_layer(norm)
    feat = feat_channels or in_channels
    custom = feat != in_channels or stacked_convs != 4  # torchvision's towers are 4 convs at the input width
    head = RetinaNetHead(in_channels, num_anchors, num_classes, norm_layer=None if custom else nl)
    if custom:
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior init of the logits (as torchvision and mmdet)
        for branch, last, out, bias in ((head.classification_head, "cls_logits", num_anchors * num_classes, prior),
                                        (head.regression_head, "bbox_reg", num_anchors * 4, 0.0)):
            branch.conv = nn.Sequential(*[Conv2dNormActivation(in_channels if i == 0 else feat, feat, 3,
                                                               norm_layer=nl) for i in range(stacked_convs)])
            setattr(branch, last, nn.Conv2d(feat if stacked_convs else in_channels, out, 3, 1, 1))
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, bias if m is getattr(branch, last) else 0.0)
    return head


class MMDetRetinaNet(RetinaNet):
    """torchvision RetinaNet with mmdet's K sigmoid logits (torchvision indexes its logits by label, so it needs
    K + 1 with an unused column 0): labels are shifted to 0..K-1 for the loss and back to 1..K for the outputs."""

    def compute_loss(self, targets, head_outputs, anchors):
        shifted = [{**t, "labels": t["labels"] - 1} for t in targets]
        return super().compute_loss(shifted, head_outputs, anchors)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        detections = super().postprocess_detections(head_outputs, anchors, image_shapes)
        for d in detections:
            d["labels"] = d["labels"] + 1
        return detections


def _float(output):
    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, output)


def predictions_in_fp32(detector: nn.Module) -> nn.Module:
    """The head predictions of ``detector`` (RPN, box and mask predictors, RetinaNet head) handed on as fp32, as
    mmdet's fp16 training does (``force_fp32`` on ``loss`` and ``get_bboxes``): the convs and linears run in the
    autocast dtype, the losses, box decoding, sigmoid / softmax scores, top-k and NMS after them in fp32. Under bf16
    they were bf16: a box corner decoded near 1000 px moved in 4-8 px steps and scores above 0.998 tied at 1.0
    (the Mask R-CNN learning check in bf16: docs/benchmarks.md)."""
    heads = (RPNHead, RetinaNetHead, MMDetBoxPredictor, MMDetMaskPredictor)
    for module in detector.modules():
        if isinstance(module, heads):
            module.register_forward_hook(lambda _module, _args, output: _float(output))
    return detector


# ----------------------------------------------------------------------------------------------------------------
# RoI heads

def build_box_head(in_channels: int, roi_size: int = 7, num_convs: int = 0, conv_channels: int = 256,
                   num_fcs: int = 2, fc_channels: int = 1024, norm: str | None = None) -> nn.Module:
    """mmdet ConvFCBBoxHead's shared part: ``num_convs`` 3x3 conv (+ norm) + ReLU, flatten (C, H, W), ``num_fcs``
    Linear + ReLU. Shared2FC is torchvision's TwoMLPHead (fc6, fc7), the others its FastRCNNConvFCHead."""
    if num_fcs < 1:
        raise UserError("the box head needs at least one fc layer")
    if num_convs == 0 and num_fcs == 2 and norm is None:
        return TwoMLPHead(in_channels * roi_size * roi_size, fc_channels)
    return FastRCNNConvFCHead((in_channels, roi_size, roi_size), [conv_channels] * num_convs, [fc_channels] * num_fcs,
                              norm_layer=norm_layer(norm))


class MMDetBoxPredictor(nn.Module):
    """mmdet's ``fc_cls`` (K + 1 scores; background FIRST here, torchvision's order, LAST in mmdet) and ``fc_reg``
    (4 K class-specific deltas, no background box). Returns (scores, deltas with a zero background box in front)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # mmdet's init
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor):
        x = x.flatten(1)
        deltas = self.bbox_pred(x)
        return self.cls_score(x), torch.cat([deltas.new_zeros(deltas.shape[0], 4), deltas], dim=1)


def build_mask_head(in_channels: int, num_convs: int = 4, conv_channels: int = 256,
                    norm: str | None = None) -> MaskRCNNHeads:
    """mmdet FCNMaskHead's convs: ``num_convs`` 3x3 conv (+ norm) + ReLU (torchvision's MaskRCNNHeads)."""
    return MaskRCNNHeads(in_channels, [conv_channels] * num_convs, 1, norm_layer=norm_layer(norm))


class MMDetMaskPredictor(nn.Sequential):
    """mmdet FCNMaskHead's ``upsample`` (2x2 stride-2 ConvTranspose + ReLU) and ``conv_logits`` (1x1 to K masks, no
    background mask); a zero background mask is put in front so torchvision's RoIHeads index masks by label."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, channels, 2, 2)),
            ("relu5_mask", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(channels, num_classes, 1)),
        ]))
        for m in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return torch.cat([logits.new_zeros(logits.shape[0], 1, *logits.shape[2:]), logits], dim=1)
