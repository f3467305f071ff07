"""Object detection and instance segmentation (``visionzoo detect``): torchvision Mask R-CNN / RetinaNet + FPN on any
dense backbone, trained per epoch as mmdet does (``epochs``, mmcv step lr with a linear warm-up per iteration, mmcv
paramwise groups, aspect-ratio grouped batches padded so every image is seen), evaluated by COCO box / mask AP.
Data, models, evaluation and drawing live in ``dense/detection/``; the loop, the run folder, resume and
checkpoints are the engine's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dense import detection as det
from ..dense.detection import DetectionConfig
from ..engine.config import split_run_path
from ..engine.distributed import barrier, broadcast_object
from ..engine.loop import fit
from ..engine.sampling import seed_model_init
from ..engine.schedule import FactorSchedule, mmcv_factor
from ..engine.state import resume_folder
from ..engine.task import Context, Task, load_model_state, read_task_model, save_task_model
from ..errors import InputNotFoundError, UserError
from ..files import safe_torch_load

TASK = "detect"


class DetectTask(Task):
    name = TASK
    best_metric = "bbox_AP"
    sampling = "pad"  # every image is seen each epoch (mmdet's (Distributed)GroupSampler pads by wrap-around)

    def prepare(self, ctx: Context) -> None:
        cfg = self.cfg
        # the embedded shapes are generated once, by the first rank, into data_dir or the run folder
        root = str(det.prepare_data(cfg, ctx.run_dir if cfg.dataset == "shapes" else None)) if ctx.is_main else None
        barrier()
        self.root = Path(broadcast_object(root))
        self.train_set = det.CocoDetection(self.root, cfg.train_split, train=True, flip_prob=cfg.flip_prob,
                                           multiscale=cfg.multiscale, masks=cfg.detector == "mask_rcnn",
                                           seed=cfg.seed)
        # scored against the COCO api's ground truth: no masks needed
        self.val_set = det.CocoDetection(self.root, cfg.val_split, train=False, masks=False)
        if len(self.train_set) == 0:
            raise UserError(f"no training image with a box in {self.root}/{cfg.train_split}")
        self.classes = list(self.train_set.classes)

    def build_model(self, ctx: Context) -> nn.Module:
        model = det.build_detector(self.cfg, len(self.classes))
        model.classes = self.classes
        return model

    def train_dataset(self, ctx: Context):
        return self.train_set

    def collate(self):
        return det.collate  # images of different sizes: tuples of images and of target dicts

    def sample_groups(self):
        # mmdet's aspect flag (width / height > 1): a batch never mixes landscape and portrait images
        if not self.cfg.group_by_aspect:
            return None
        return (np.array(self.train_set.aspect_ratios()) > 1).astype(int).tolist()

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return det.build_optimizer(model, self.cfg, lr)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        cfg = self.cfg
        steps = [int(e * ctx.steps_per_epoch) for e in cfg.lr_steps]  # lr_steps are epochs

        def factor(step: int) -> float:  # mmcv's LrUpdaterHook (step policy, linear warm-up), per iteration
            return mmcv_factor(step, ctx.total_steps, policy="step", warmup_iters=cfg.warmup_iters,
                               warmup_ratio=cfg.warmup_ratio, steps=steps)

        return FactorSchedule(lr, factor)

    def compile(self, net: nn.Module, mode: str) -> nn.Module:
        # a torchvision detector is no single graph (per-image resizing, proposal sampling, NMS, RoIAlign on
        # data-dependent box counts): the backbone + FPN compile, in place; the heads and post-processing stay eager
        inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        inner.backbone.compile(mode=None if mode == "default" else mode)
        return net

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        images, targets = batch
        losses = net(list(images), list(targets))
        out = {(k if k.startswith("loss") else f"loss_{k}"): v for k, v in losses.items()}
        return {"loss": sum(losses.values()), **out}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        cfg = self.cfg
        return det.evaluate(model, self.val_set, ctx.device, cfg.batch_size, ctx.rank, ctx.world_size,
                            amp=cfg.amp, workers=cfg.workers)

    def export(self, model: nn.Module, folder, metadata: dict) -> None:
        # the config that rebuilds the detector; data_dir names the data it trained on (for eval), classes the names
        config = {**dataclasses.asdict(self.cfg), "data_dir": str(Path(self.root).resolve()), "pretrained": None,
                  "classes": self.classes}
        save_task_model(model, folder, TASK, config, metadata)

    def summary(self) -> dict:
        return {"classes": self.classes, "num_classes": len(self.classes), "train_size": len(self.train_set),
                "val_size": len(self.val_set)}

    def header(self) -> str:
        cfg = self.cfg
        return (f"{cfg.detector} on {cfg.model} (neck {cfg.neck}), {len(self.train_set)} train / "
                f"{len(self.val_set)} val images ({cfg.dataset}), {len(self.classes)} classes")


def untrained_detector(cfg: DetectionConfig, device="cpu") -> nn.Module:
    """The detector a run of ``cfg`` starts from (the loop's seeded init, the recipe's pretrained backbone): the
    baseline of the learning checks. Class names come from the training annotations."""
    root = det.prepare_data(cfg, None)
    classes = det.CocoDetection(root, cfg.train_split, masks=False).classes
    seed_model_init(cfg.seed)  # the RNG state the loop builds the model in
    model = det.build_detector(cfg, len(classes))
    model.classes = classes
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# train (the CLI's and older callers' entry point)

_OLD_HINT = ("its weights still evaluate with `detect eval --checkpoint`. Start a new run (--pretrained keeps the "
             "backbone).")
# what a resumed run may not change (it keeps its saved recipe)
RECIPE_KEYS = ("detector", "model", "model_kwargs", "neck", "dataset", "epochs", "batch_size", "seed", "lr", "lr_steps")


def train(cfg: DetectionConfig, out=None, resume=None, device: str | None = None, max_iters: int | None = None,
          check_recipe: bool = True) -> dict:
    """Train ``cfg`` in a new run folder (``out``: the run folder itself, else ``output/experiment``) or continue
    ``resume`` (a run folder) exactly. ``max_iters`` (= ``max_steps``) stops early; the schedule stays that of the
    full run. Returns the run's summary (the last evaluation's ``bbox_AP`` etc., ``best``, ``classes``)."""
    if out is not None:
        cfg = dataclasses.replace(cfg, **split_run_path(out))
    if max_iters is not None:
        cfg = dataclasses.replace(cfg, max_steps=max_iters)
    cfg.check()
    if resume is not None:
        resume = resume_folder(resume, "last.pth", _OLD_HINT, cfg if check_recipe else None, RECIPE_KEYS)
    return fit(DetectTask(cfg), resume=resume, device=device)


# ----------------------------------------------------------------------------------------------------------------
# reading a trained detector (eval, visualize)

def _num_classes(state: dict) -> int | None:
    """Foreground classes of a detector state dict (its box predictor or RetinaNet logits), None if unknown."""
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if torch.is_tensor(w):
        return int(w.shape[0]) - 1
    w = state.get("head.classification_head.cls_logits.weight")
    b = state.get("head.classification_head.cls_logits.bias")
    if torch.is_tensor(w) and torch.is_tensor(b):
        anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
        return int(b.shape[0]) // anchors  # mmdet's K sigmoid logits (no background column)
    return None


def load_detector(path, device="cpu") -> tuple[nn.Module, DetectionConfig, list | None, dict]:
    """(model in eval mode, its config, class names, info) from ``path``: a run folder (best/, else last/), an
    exported folder (config.json with task 'detect' + model.safetensors), a train_state.pt, or an older last.pth /
    run folder of last.pth. ``info``: ``source``, ``run_dir`` (where a shapes run keeps its data) and, for torch files,
    ``step``. Torch files are read with weights_only=True, so nothing in them can run."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"checkpoint not found: {path} (give a `visionzoo detect train` run folder, its best/ "
                                 f"or last/, or an older last.pth)")
    config = state = None
    if path.suffix == ".safetensors":
        path = path.parent
    # where a shapes run keeps its data: the run folder (also for its best/, last/ or a file inside it)
    run_dir = path if path.is_dir() else path.parent
    if run_dir.name in ("best", "last", "ema"):
        run_dir = run_dir.parent
    info: dict = {"source": str(path), "run_dir": run_dir}
    if path.is_dir():
        try:
            config, state, _ = read_task_model(path, TASK)
        except FileNotFoundError:
            for name in ("train_state.pt", "last.pth"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise InputNotFoundError(
                    f"{path} holds no detector (best/ or last/ of a `visionzoo detect train` run, an exported folder, "
                    f"train_state.pt, or an older run's last.pth)") from None
    if state is None:
        obj = safe_torch_load(path)
        from ..dense.detection import official

        if official.is_official_checkpoint(obj):  # an mmdet .pth: the recipe of its config, the weights converted
            model, cfg, classes = official.load_official_checkpoint(obj, info["source"])
            model.classes = classes
            return model.to(device).eval(), cfg, classes, info
        if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)):
            raise UserError(f"{path} is not a detection checkpoint (no model + config): pass the run folder.")
        config, state = dict(obj["config"]), obj["model"]
        info["step"] = int(obj.get("iteration") or (obj.get("progress") or {}).get("global_step") or 0)
        if obj.get("classes"):
            config["classes"] = list(obj["classes"])
        elif (path.parent / "last" / "config.json").is_file():  # a train_state.pt: its run's export names them
            saved = json.loads((path.parent / "last" / "config.json").read_text()).get("config") or {}
            if saved.get("classes"):
                config["classes"] = saved["classes"]
    classes = config.pop("classes", None)
    cfg = DetectionConfig.from_saved(config, f"checkpoint {info['source']}")
    cfg = dataclasses.replace(cfg, pretrained=None)  # the weights come from the checkpoint
    if cfg.dataset == "shapes" and cfg.data_dir and not Path(cfg.data_dir).is_dir():
        cfg = dataclasses.replace(cfg, data_dir=None)  # the run folder moved: its shapes are next to the weights
    num_classes = len(classes) if classes else _num_classes(state)
    if num_classes is None:
        raise UserError(f"{info['source']}: cannot tell the detector's number of classes from it.")
    model = load_model_state(det.build_detector(cfg, num_classes, pretrained=False), state, info["source"])
    model.classes = list(classes) if classes else None
    return model.to(device).eval(), cfg, model.classes, info
