"""The point-cloud recipe (``PointCloudConfig``), the class lists and the small CPU model."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...engine.config import RecipeError, RunConfig

_logger = logging.getLogger("visionzoo")
SCANOBJECTNN_CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet")
SCANOBJECTNN_FILES = {"train": "training_objectdataset_augmentedrot_scale75.h5",
                      "test": "test_objectdataset_augmentedrot_scale75.h5"}
SHAPE_CLASSES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "helix", "plane")
# A small coc_pointmlp for CPU runs and tests (~0.2M params): 2 stages (128 points -> 32 -> 8 anchors), 8 neighbours,
# one block each; no head dropout (the official 0.5 slows learning on a few hundred clouds).
SMALL_MODEL_KWARGS = dict(points=128, embed_dim=16, dim_expansion=[2, 2], pre_blocks=[1, 1], pos_blocks=[1, 1],
                          k_neighbors=[8, 8], reducers=[4, 4], drop_rate=0.0)


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclass
class PointCloudConfig(RunConfig):
    """Point-cloud recipe: the shared ``RunConfig`` fields (seed, epochs, batch_size, lr, output, experiment, ...)
    with the official recipe's defaults, plus the task's own. The number of points is ``model_kwargs['points']``
    (default 1024)."""

    KIND = "point-cloud"

    task: str = "pointcloud"
    model: str = "coc_pointmlp"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "scanobjectnn"  # scanobjectnn | shapes
    data_dir: str | None = None  # scanobjectnn: folder holding main_split/ (or the two h5 files)
    num_classes: int | None = None  # None: from the dataset
    world_size: int = 1  # processes the recipe was written for (documentation)
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = "cosine"  # cosine annealing per epoch to min_lr (constant within an epoch) | none
    min_lr: float = 1e-4
    smoothing: float = 0.2
    # RunConfig fields whose default is the official recipe's
    epochs: int = 250
    batch_size: int = 32
    lr: float | None = 0.01
    workers: int = 0  # the clouds are in memory: worker processes only add start-up time

    @property
    def points(self) -> int:
        return int(self.model_kwargs.get("points", 1024))

    def check(self) -> None:
        super().check()
        if self.opt != "sgd":
            raise RecipeError(f"point-cloud training uses opt 'sgd' (the official optimizer), got {self.opt!r}.")
        if self.sched not in ("cosine", "none"):
            raise RecipeError(f"point-cloud sched must be 'cosine' or 'none', got {self.sched!r}.")
        if not 0 <= self.smoothing < 1:
            raise RecipeError(f"smoothing must be in [0, 1), got {self.smoothing}.")
