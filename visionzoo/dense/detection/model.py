"""Backbone + FPN + torchvision Mask R-CNN / RetinaNet heads, with mmdet's RoI pooling and anchors."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from .config import MULTISCALE_DETR, DetectionConfig

# ----------------------------------------------------------------------------------------------------------------
# model

def _backbone_with_fpn(cfg: DetectionConfig, pretrained: bool = True):
    """DenseBackbone + torchvision FPN as the ``backbone`` torchvision detectors expect (an ``out_channels`` attr and
    an OrderedDict of maps). Returns (module, strides of the FPN outputs)."""
    from collections import OrderedDict

    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

    from ..backbones import build_backbone

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
        extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)  # in == out: convs on the FPN output P5
        out_strides = strides + [strides[-1] * 2, strides[-1] * 4]
    else:
        extra = LastLevelMaxPool()
        out_strides = strides + [strides[-1] * 2]

    class BackboneWithFPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.fpn = FeaturePyramidNetwork(list(body.out_channels), cfg.fpn_channels, extra_blocks=extra)
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


def build_detector(cfg: DetectionConfig, num_classes: int, pretrained: bool = True):
    """A torchvision MaskRCNN / RetinaNet on the config's backbone. ``num_classes`` excludes the background."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    backbone, strides = _backbone_with_fpn(cfg, pretrained)
    mean, std = list(backbone.body.mean), list(backbone.body.std)
    long_max, short = int(cfg.img_scale[0]), int(cfg.img_scale[1])
    # a tuple: one short side drawn per training batch (multi-scale); evaluation uses the last one
    min_size = (short,)
    if cfg.multiscale == "detr":
        min_size = tuple(s for s in MULTISCALE_DETR if s < short) + (short,)
    C = cfg.fpn_channels
    if cfg.detector == "mask_rcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads
        from torchvision.ops import MultiScaleRoIAlign

        scale = cfg.anchor_scale or 8.0
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        names = [str(i) for i in range(len(strides) - 1)]  # RoIs pool from P2-P5, not the max-pool level
        if cfg.roi_align == "mmdet":
            box_pool, mask_pool = (mmdet_roi_pool(names, strides[:-1], n) for n in (7, 14))
        else:
            box_pool, mask_pool = MultiScaleRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 14, 2)
        if cfg.box_head == "4conv1fc":
            box_head = FastRCNNConvFCHead((C, 7, 7), [C] * 4, [cfg.representation_size], norm_layer=nn.BatchNorm2d)
        else:
            box_head = TwoMLPHead(C * 49, cfg.representation_size)
        mask_ch = cfg.mask_head_channels or C
        model = MaskRCNN(
            backbone, num_classes=num_classes + 1, min_size=min_size, max_size=long_max, image_mean=mean,
            image_std=std, rpn_anchor_generator=anchors, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=box_pool, box_head=box_head, mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(C, [mask_ch] * 4, 1), box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_detections_per_img=cfg.detections_per_img)
        if mask_ch != 256:  # MaskRCNN's default predictor assumes 256 input channels
            from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

            model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_ch, mask_ch, num_classes + 1)
        if cfg.representation_size != 1024:
            from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

            model.roi_heads.box_predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
    else:
        from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

        scale = cfg.anchor_scale or 4.0
        anchors = AnchorGenerator(tuple(tuple(scale * s * 2 ** (k / 3) for k in range(3)) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
        # torchvision indexes the class logits by label (1..K here), so K + 1 outputs; column 0 is never positive
        norm = None
        if cfg.retina_head_norm == "gn":  # torchvision's retinanet_v2 head; converges much faster from scratch
            from functools import partial

            norm = partial(nn.GroupNorm, 16)
        head = RetinaNetHead(C, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=norm)
        model = RetinaNet(backbone, num_classes + 1, min_size=min_size, max_size=long_max, image_mean=mean,
                          image_std=std, anchor_generator=anchors, head=head,
                          detections_per_img=cfg.detections_per_img)
    # pad to the backbone's size divisor (CoC folds, CSWin stripes, 32 for the pyramid), not torchvision's fixed 32
    model.transform = GeneralizedRCNNTransform(min_size, long_max, mean, std,
                                               size_divisible=backbone.body.size_divisor)
    model.classes = None
    return model
