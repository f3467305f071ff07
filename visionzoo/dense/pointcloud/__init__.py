"""Point-cloud classification with the CoC point-cloud model (``coc_pointmlp``): data, loss, metrics, CLI.

Follows the official CoC ``pointcloud/main.py`` recipe (spec coc.md section 6): ScanObjectNN PB_T50_RS h5 files,
first 1024 points, train augmentation = per-axis scale U(2/3, 3/2) + translation U(-0.2, 0.2) + point shuffle,
label-smoothed cross-entropy (eps 0.2, the PointMLP ``cal_loss`` form), SGD lr 0.01 / momentum 0.9 / wd 1e-4,
cosine annealing per epoch down to 1e-4, batch 32 with drop_last; metrics OA and mAcc (balanced accuracy), the best
test epoch is reported. An embedded procedural dataset (``shapes``) makes the whole path runnable on CPU.

Training runs on the shared engine (``visionzoo/tasks/pointcloud.py``, ``engine/loop.py``): the run folder, resume,
metrics.csv and best/ last/ are the engine's. Data is held in memory as numpy arrays (ScanObjectNN is ~12k clouds
of 1024x3 floats).

Modules: ``config`` (PointCloudConfig, class lists), ``data`` (ScanObjectNN, shapes, augmentation), ``training``
(loss, metrics, model, ``train``), ``commands`` (what ``visionzoo pointcloud`` runs). Names are re-exported lazily,
so reading the config does not import torch.
"""
from __future__ import annotations

from ..._lazy import lazy_exports

_EXPORTS = {
    "PointCloudConfig": "config", "SCANOBJECTNN_CLASSES": "config", "SCANOBJECTNN_FILES": "config",
    "SHAPE_CLASSES": "config", "SMALL_MODEL_KWARGS": "config",
    "PointCloudSplit": "data", "_import_h5py": "data", "_random_rotations": "data", "_shape": "data",
    "_triangles": "data", "_unit": "data", "augment": "data", "load_data": "data", "load_scanobjectnn": "data",
    "make_shapes": "data", "parse_data": "data", "scanobjectnn_paths": "data",
    "build_model": "training", "classification_metrics": "training", "metrics_from_counts": "training",
    "smooth_ce": "training", "train": "training",
    "config_from_args": "commands", "run": "commands",
}
__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))
__getattr__ = lazy_exports(__name__, _EXPORTS)
