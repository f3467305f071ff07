"""Backbone + FPN + torchvision Mask R-CNN / RetinaNet, with mmdet's parts (heads.py) and RoI pooling."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ...errors import UserError
from .config import MULTISCALE_DETR, DetectionConfig

# ----------------------------------------------------------------------------------------------------------------
# model

# the recipe's box_head -> mmdet ConvFCBBoxHead (shared convs, shared fcs, conv norm)
BOX_HEADS = {"2fc": (0, 2, None), "4conv1fc": (4, 1, "bn")}

def _backbone_with_fpn(cfg: DetectionConfig, pretrained: bool = True):
    """DenseBackbone + mmdet's FPN as the ``backbone`` torchvision detectors expect (an ``out_channels`` attr and
    an OrderedDict of maps). Returns (module, strides of the FPN outputs)."""
    from collections import OrderedDict

    from ..backbones import build_backbone
    from .heads import build_fpn

    body = build_backbone(cfg.model, neck=cfg.neck, out_indices=cfg.out_indices,
                          checkpoint=cfg.pretrained if pretrained else None, drop_path_rate=cfg.drop_path,
                          model_kwargs=cfg.model_kwargs)
    strides = list(body.strides)
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise UserError(f"{cfg.model} with neck={cfg.neck!r} gives maps at strides {strides}; an FPN needs "
                        f"increasing strides: use neck='simple' or 'adapter' for single-scale backbones")
    if cfg.detector == "retinanet":  # RetinaNet starts at stride 8 (mmdet start_level=1 for 4-level backbones)
        keep = [i for i, s in enumerate(strides) if s >= 8]
        if len(keep) < len(strides):
            body.keep_levels(keep)
            strides = list(body.strides)
        # P6, P7: stride-2 convs on the FPN output P5 (mmdet add_extra_convs='on_output')
        fpn = build_fpn(body.out_channels, cfg.fpn_channels, len(strides) + 2, "on_output", cfg.fpn_norm)
        out_strides = strides + [strides[-1] * 2, strides[-1] * 4]
    else:  # P6 = max_pool(P5, 1, stride 2)
        fpn = build_fpn(body.out_channels, cfg.fpn_channels, len(strides) + 1, "maxpool", cfg.fpn_norm)
        out_strides = strides + [strides[-1] * 2]

    class BackboneWithFPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.fpn = fpn
            self.out_channels = cfg.fpn_channels

        def forward(self, x):
            maps = self.body(x)
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    return BackboneWithFPN(), out_strides


def mmdet_roi_pool(featmap_names, strides, output_size: int):
    """mmdet's SingleRoIExtractor with mmcv's RoIAlign (``aligned=True``: pixel centres at +0.5, and
    ``sampling_ratio=0``: an adaptive ceil(roi size / output size) grid), a drop-in for torchvision's
    ``MultiScaleRoIAlign``, whose ``roi_align`` call is fixed to aligned=False. Level of a box:
    floor(log2(sqrt(w * h) / 56 + 1e-6)) clamped to the levels, which is torchvision's LevelMapper too."""
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    class MMDetRoIAlign(MultiScaleRoIAlign):  # a subclass: torchvision's MaskRCNN checks the type
        def __init__(self):
            super().__init__([str(n) for n in featmap_names], int(output_size), sampling_ratio=0)
            self.strides = [int(v) for v in strides]

        def forward(self, features, boxes, image_shapes=None):
            maps = [features[name] for name in self.featmap_names]
            rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
            size = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
            levels = torch.floor(torch.log2(size / 56 + 1e-6)).clamp(0, len(maps) - 1)
            out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1]) + self.output_size)
            # one roi_align per level (4 calls): the RoIs of a level are a data-dependent subset, as in mmdet
            for level, (fmap, stride) in enumerate(zip(maps, self.strides)):
                idx = torch.nonzero(levels == level).squeeze(1)
                if idx.numel():
                    out[idx] = roi_align(fmap, rois[idx], self.output_size, 1.0 / stride, sampling_ratio=0,
                                         aligned=True).to(out.dtype)
            return out

    return MMDetRoIAlign()


def mmdet_resize_size(h: int, w: int, short: int, long_max: int) -> tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: scale = min(short / short side, long_max / long side), each side
    ``int(side * scale + 0.5)`` (torchvision floors, e.g. 640x480 -> 1066x800 instead of 1067x800)."""
    scale = min(short / min(h, w), long_max / max(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's detector input transform (normalise, resize keep-ratio, pad to ``size_divisible``, map the
    outputs back) with mmdet's rounding of the resized size and mmdet's mask pasting (:func:`paste_masks`)."""

    def resize(self, image, target=None):
        from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes

        h, w = image.shape[-2:]
        if self.training and self._skip_resize:
            return image, target
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        nh, nw = mmdet_resize_size(h, w, short, self.max_size)
        image, target = _resize_image_and_masks(image, short, self.max_size, target, fixed_size=(nw, nh))
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]  # boxes back to the original image first, then the masks
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks(m, r["boxes"], size)
        return result


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size, max_elements: int = 1 << 24) -> torch.Tensor:
    """mmdet's mask pasting: each pixel centre of the image, in the box's normalised coordinates, bilinearly samples
    the (N, 1, M, M) mask probabilities (zeros outside, align_corners=False): (N, 1, H, W) probabilities, which
    mmdet thresholds at 0.5. (torchvision first pads the mask by one pixel, widens the box by (M + 2) / M and
    resizes it to the box's integer size.) Chunked so the sampling grid stays under ``max_elements`` points."""
    import torch.nn.functional as F

    H, W = int(size[0]), int(size[1])
    out = masks.new_zeros((masks.shape[0], 1, H, W))
    if not len(masks):
        return out
    ys = torch.arange(H, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=masks.device, dtype=torch.float32) + 0.5
    step = max(1, max_elements // max(H * W, 1))
    for i in range(0, len(masks), step):
        b = boxes[i:i + step].float()
        x0, y0, x1, y1 = (b[:, j, None] for j in range(4))
        gx = (xs[None] - x0) / (x1 - x0).clamp_min(1e-6) * 2 - 1  # (n, W)
        gy = (ys[None] - y0) / (y1 - y0).clamp_min(1e-6) * 2 - 1  # (n, H)
        grid = torch.stack([gx[:, None, :].expand(-1, H, -1), gy[:, :, None].expand(-1, -1, W)], dim=3)
        out[i:i + step] = F.grid_sample(masks[i:i + step].float(), grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=False).to(out.dtype)
    return out


def build_detector(cfg: DetectionConfig, num_classes: int, pretrained: bool = True):
    """A torchvision MaskRCNN / RetinaNet with mmdet's parts (``heads.py``) on the config's backbone.
    ``num_classes`` excludes the background."""
    from .heads import (MMDetBoxPredictor, MMDetMaskPredictor, MMDetRetinaNet, anchor_generator, build_box_head,
                        build_mask_head, build_retina_head, build_rpn_head, predictions_in_fp32)

    backbone, strides = _backbone_with_fpn(cfg, pretrained)
    mean, std = list(backbone.body.mean), list(backbone.body.std)
    long_max, short = int(cfg.img_scale[0]), int(cfg.img_scale[1])
    # a tuple: one short side drawn per training batch (multi-scale); evaluation uses the last one
    min_size = (short,)
    if cfg.multiscale == "detr":
        min_size = tuple(s for s in MULTISCALE_DETR if s < short) + (short,)
    C = cfg.fpn_channels
    if cfg.detector == "mask_rcnn":
        from torchvision.models.detection.mask_rcnn import MaskRCNN
        from torchvision.ops import MultiScaleRoIAlign

        anchors = anchor_generator(strides, (cfg.anchor_scale or 8.0,))
        names = [str(i) for i in range(len(strides) - 1)]  # RoIs pool from P2-P5, not the max-pool level
        if cfg.roi_align == "mmdet":
            box_pool, mask_pool = (mmdet_roi_pool(names, strides[:-1], n) for n in (7, 14))
        else:
            box_pool, mask_pool = MultiScaleRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 14, 2)
        convs, fcs, norm = BOX_HEADS[cfg.box_head]
        box_head = build_box_head(C, 7, convs, C, fcs, cfg.representation_size, norm)
        mask_ch = cfg.mask_head_channels or C
        rpn_head = build_rpn_head(C, anchors.num_anchors_per_location()[0])
        model = MaskRCNN(
            backbone, num_classes=None, min_size=min_size, max_size=long_max, image_mean=mean, image_std=std,
            rpn_anchor_generator=anchors, rpn_head=rpn_head, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, box_roi_pool=box_pool, box_head=box_head,
            box_predictor=MMDetBoxPredictor(cfg.representation_size, num_classes), mask_roi_pool=mask_pool,
            mask_head=build_mask_head(C, 4, mask_ch), mask_predictor=MMDetMaskPredictor(mask_ch, mask_ch, num_classes),
            box_batch_size_per_image=cfg.box_batch_size_per_image, box_detections_per_img=cfg.detections_per_img)
    else:
        # mmdet octave scales: octave_base_scale 4 x 2^(k/3), k = 0, 1, 2
        scale = cfg.anchor_scale or 4.0
        anchors = anchor_generator(strides, tuple(scale * 2 ** (k / 3) for k in range(3)))
        head = build_retina_head(C, anchors.num_anchors_per_location()[0], num_classes, norm=cfg.retina_head_norm,
                                 norm_groups=16)  # gn: torchvision's retinanet_v2 head
        model = MMDetRetinaNet(backbone, num_classes, min_size=min_size, max_size=long_max, image_mean=mean,
                               image_std=std, anchor_generator=anchors, head=head,
                               detections_per_img=cfg.detections_per_img)
    # pad to the backbone's size divisor (CoC folds, CSWin stripes, 32 for the pyramid), not torchvision's fixed 32
    model.transform = MMDetTransform(min_size, long_max, mean, std, size_divisible=backbone.body.size_divisor)
    model.classes = None
    return predictions_in_fp32(model)
