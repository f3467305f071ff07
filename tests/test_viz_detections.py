"""`detect visualize` drawing: small images zoomed, tags that never overlap, no torch warning on PIL's arrays."""
import warnings

import numpy as np
import torch
from PIL import Image

from visionzoo.viz.detections import _overlaps, _place_tag, draw_detections


def _crowded(n=4, height=64, width=64):
    """``n`` confident detections of nearly the same object (their tags would all sit at one corner)."""
    boxes = torch.tensor([[8.0 + i, 10.0 + i, 40.0 + i, 44.0] for i in range(n)])
    masks = torch.zeros(n, 1, height, width)
    masks[:, :, 12:30, 10:30] = 1
    return dict(boxes=boxes, labels=torch.arange(n) % 3 + 1, scores=torch.linspace(0.9, 0.6, n), masks=masks)


def test_small_image_is_zoomed_and_read_only_arrays_give_no_warning():
    image = np.asarray(Image.new("RGB", (64, 48), (10, 20, 30)))  # PIL's arrays are read-only
    assert not image.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "NumPy array is not writable" would raise here
        drawn = draw_detections(image, _crowded(height=48), ["circle", "square", "triangle"], score_thresh=0.5)
    assert drawn.size == (64 * 6, 48 * 6)  # the short side reaches 256
    assert draw_detections(image, _crowded(height=48), None, min_side=0).size == (64, 48)  # at its own size when asked


def test_tags_of_overlapping_boxes_do_not_overlap():
    placed = []
    for box in _crowded(6).get("boxes").mul(4).round().int().tolist():
        rect = _place_tag(box, (90, 16), placed, 256, 256)
        assert 0 <= rect[0] and rect[2] <= 256 and 0 <= rect[1] and rect[3] <= 256
        assert not any(_overlaps(rect, r) for r in placed)
        placed.append(rect)
    # and drawn: each tag is in its detection's colour, so all colours show up in the tag band area
    drawn = np.asarray(draw_detections(np.zeros((64, 64, 3), np.uint8), _crowded(3), ["a", "b", "c"]))
    assert drawn.shape == (256, 256, 3) and len(np.unique(drawn.reshape(-1, 3), axis=0)) > 4
