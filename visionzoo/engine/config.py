"""Recipes are data: one YAML per recipe, loaded into a dataclass, overridable as ``key=value`` from the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_logger = logging.getLogger("visionzoo")

# the one spelling of a precision (``amp`` key, ``--amp`` flag of every command that runs a model):
# auto = bf16 autocast where the device computes bf16 natively (oneDNN's check on CPUs, Ampere+ GPUs), else fp32
AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
# torch.compile modes (torch._inductor.list_mode_options() and "default"), for --torchcompile / --compile
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_AMP_SPELLINGS = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "amp_bfloat16": "bf16", "fp16": "fp16",
                  "float16": "fp16", "half": "fp16", "fp32": "fp32", "float32": "fp32", "none": "fp32",
                  "false": "fp32", "off": "fp32", "no": "fp32", "0": "fp32"}
_AMP_TRUE = ("true", "on", "yes", "1")
# how a labelled subset is drawn (TrainConfig.label_sampling, `visionzoo semisup --sampling`; evals/semisup.py)
LABEL_SAMPLINGS = ("balanced", "random")


def amp_name(value, true_means: str = "bf16") -> str:
    """The one spelling (auto | bf16 | fp16 | fp32) of a precision. Older spellings are read too: ``true`` (autocast
    in ``true_means``), ``false``/``null``, ``bfloat16``, ``float16``, ``float32``."""
    if value is None or value is False:
        return "fp32"
    if value is True or str(value).strip().lower() in _AMP_TRUE:
        return true_means
    name = _AMP_SPELLINGS.get(str(value).strip().lower())
    if name is None:
        raise ConfigError(f"amp {value!r} is not a precision: use one of {', '.join(AMP_CHOICES)} "
                          f"(e.g. --amp bf16).")
    return name


def add_amp_flag(parser: argparse.ArgumentParser, dest: str = "amp", default=None, alone: str = "bf16",
                 many: bool = False) -> None:
    """``--amp {auto,bf16,fp16,fp32}`` (``--amp`` alone: ``alone``), the same flag in every command; ``many``: a
    list of precisions (``--amp fp32 bf16``; ``--amp`` alone: ``[alone]``), for tools that compare them."""
    def parse(text: str) -> str:
        try:
            return amp_name(text, alone)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "precision"
    nargs = dict(nargs="*", action=_AmpList, const=[alone]) if many else dict(nargs="?", const=alone)
    parser.add_argument("--amp", dest=dest, default=default, type=parse, metavar="{" + ",".join(AMP_CHOICES) + "}",
                        help=f"precision{'s' if many else ''}: bf16 / fp16 autocast, fp32, or auto (bf16 where the "
                             f"CPU/GPU computes it natively, else fp32); --amp alone: {alone} (default: "
                             f"{default or 'the recipe or config value, else fp32'})", **nargs)


class _AmpList(argparse.Action):
    """``--amp A B ...`` as a list; ``--amp`` alone: the ``const`` list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(values) or list(self.const))


@dataclass
class RunConfig:
    """What every task shares, one name per setting (timm's train.py names where they mean the same). Task configs
    add only their own fields, and may change a default."""

    seed: int = 0
    # length: epochs over the training set, or ``steps`` optimizer steps when set (iteration-based recipes)
    epochs: int = 10
    steps: int | None = None
    max_steps: int | None = None  # stop early after this many steps (the schedule stays that of the full run)
    batch_size: int = 64  # per process
    grad_accum_steps: int = 1
    workers: int = 2
    # learning rate: absolute, or, when lr is None, lr_base x the ratio global_batch / lr_base_size scaled as
    # lr_base_scale says: linear | sqrt | "" (timm's train.py rule: sqrt for adaptive optimizers, ada* and lamb,
    # else linear). lr_base None: timm's 0.1 for SGD-type optimizers, 1e-3 for adaptive ones.
    lr: float | None = None
    lr_base: float | None = 1e-3
    lr_base_size: int = 1024
    lr_base_scale: str = "linear"
    clip_grad: float | None = None
    clip_mode: str = "norm"  # norm | value | agc | per_tensor
    # precision and speed: amp is auto | bf16 | fp16 | fp32 (AMP_CHOICES; engine/precision.py resolves it)
    amp: str = "fp32"
    amp_dtype: str | None = None  # the older spelling (amp: true + amp_dtype: float16), folded into amp
    channels_last: bool = False
    torchcompile: str | None = None
    sync_bn: bool = False  # SyncBatchNorm across processes (DDP on CUDA only)
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    # run control
    output: str = "runs"  # parent folder of the run folder
    experiment: str | None = None  # the run folder's name (default: <model>-<date>-<time>)
    log_interval: int = 20  # steps
    eval_every: int = 1  # epochs
    eval_every_steps: int | None = None  # evaluate (and write a metrics row) every N steps instead
    checkpoint_every_steps: int | None = None  # also save the training state every N steps
    save_every_epochs: int = 0  # weights-only snapshots/epoch_NNNN.safetensors every N epochs and the last; 0: none
    save_init_snapshot: bool = False  # with save_every_epochs: also epoch_0000, the weights before training
    notes: str = ""

    # a task config's older recipe keys: RENAMED_KEYS {old: new} (read with a one-line note), IGNORED_KEYS
    # {old: why} (dropped with a note); KIND names the recipes in messages
    RENAMED_KEYS: ClassVar[dict] = {}
    IGNORED_KEYS: ClassVar[dict] = {}
    KIND: ClassVar[str] = "config"
    AMP_TRUE: ClassVar[str] = "bf16"  # what the older ``amp: true`` without amp_dtype meant for this config
    # what a saved config (run folder, export) written before a key existed meant by leaving it out
    OLDER_DEFAULTS: ClassVar[dict] = {"lr_base_scale": "linear"}

    def __post_init__(self) -> None:
        # every way a config is made (recipe, flags, --set, a saved config, dataclasses.replace) ends in one spelling
        old = (self.amp, self.amp_dtype)
        if self.amp_dtype is not None:
            on = self.amp is True or amp_name(self.amp, self.AMP_TRUE) != "fp32"
            self.amp = amp_name(self.amp_dtype) if on else "fp32"
            self.amp_dtype = None
        else:
            self.amp = amp_name(self.amp, self.AMP_TRUE)
        if old[1] is not None or old[0] is True:
            _logger.info("amp: %s%s is now spelled amp: %s", old[0], f" + amp_dtype: {old[1]}" if old[1] else "",
                         self.amp)

    def global_batch(self, world_size: int | None = None) -> int:
        return self.batch_size * self.grad_accum_steps * (world_size or 1)

    def _adaptive_opt(self) -> bool:
        """timm's test for an adaptive optimizer (sqrt lr scaling): 'ada' or 'lamb' in its name."""
        return any(k in str(getattr(self, "opt", "")).lower() for k in ("ada", "lamb"))

    def base_lr(self) -> float:
        if self.lr_base is not None:
            return float(self.lr_base)
        return 1e-3 if self._adaptive_opt() else 0.1

    def lr_scaling(self) -> str:
        return self.lr_base_scale or ("sqrt" if self._adaptive_opt() else "linear")

    def resolved_lr(self, world_size: int = 1) -> float:
        if self.lr is not None:
            return float(self.lr)
        ratio = self.global_batch(world_size) / float(self.lr_base_size)
        return self.base_lr() * (ratio ** 0.5 if self.lr_scaling() == "sqrt" else ratio)

    def lr_rule(self, world_size: int = 1) -> str:
        """The resolved lr with the rule that gave it, for run headers."""
        lr = self.resolved_lr(world_size)
        if self.lr is not None:
            return f"lr {lr:.3g}"
        ratio = f"{self.global_batch(world_size)}/{self.lr_base_size}"
        base = f"lr_base {self.base_lr():g}" + (f" ({getattr(self, 'opt', '')}'s default)" if self.lr_base is None
                                                else "")
        return f"lr {lr:.3g} = {base} x " + (f"sqrt({ratio})" if self.lr_scaling() == "sqrt" else ratio)

    def check(self) -> None:
        """Values no run can use, refused before anything is built."""
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_interval", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("steps", "max_steps", "eval_every_steps", "checkpoint_every_steps"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise RecipeError(f"{name} must be >= 1 (or unset), got {v}.")
        if int(self.save_every_epochs or 0) < 0:
            raise RecipeError(f"save_every_epochs must be >= 0 (0: no snapshots), got {self.save_every_epochs}.")
        if self.workers < 0:
            raise RecipeError(f"workers must be >= 0, got {self.workers}.")
        if self.torchcompile is not None and self.torchcompile not in COMPILE_MODES:
            raise RecipeError(f"torchcompile={self.torchcompile!r} is not a torch.compile mode: use one of "
                              f"{', '.join(COMPILE_MODES)} (--torchcompile / --compile alone: default).")
        if self.lr is not None and not float(self.lr) >= 0:
            raise RecipeError(f"lr must be >= 0 (or unset: lr_base x global batch / lr_base_size), got {self.lr}.")
        if not self.base_lr() > 0 or int(self.lr_base_size) < 1:
            raise RecipeError(f"lr_base must be > 0 and lr_base_size >= 1, got {self.lr_base} and "
                              f"{self.lr_base_size}.")
        if self.lr_base_scale not in ("", "linear", "sqrt"):
            raise RecipeError(f"lr_base_scale must be linear, sqrt or empty (timm's rule: sqrt for adaptive "
                              f"optimizers, else linear), got {self.lr_base_scale!r}.")
        task = {f.name: f.default for f in dataclasses.fields(self)}.get("task")
        if task is not None and self.task != task:
            raise RecipeError(f"this is a {self.task!r} recipe (task: {self.task}); this command takes "
                              f"{self.KIND} recipes (task: {task}).")

    @classmethod
    def upgrade_keys(cls, data: dict, source: str = "recipe") -> dict:
        """``data`` with the older key names read as the new ones (one logged note each) and ignored keys dropped;
        an older 0 for a setting that is now optional (``None``) meant "never" and becomes ``None``."""
        data = dict(data)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for old, new in cls.RENAMED_KEYS.items():
            if old in data:
                value = data.pop(old)
                if value == 0 and defaults.get(new) is None:
                    value = None
                if new in data and data[new] != value:
                    raise RecipeError(f"{source}: both {old} (the older name) and {new} are set; keep {new}.")
                data[new] = value
                _logger.info("%s: key '%s' is now spelled '%s'", source, old, new)
        for old, why in cls.IGNORED_KEYS.items():
            if old in data:
                data.pop(old)
                _logger.info("%s: key '%s' is ignored (%s)", source, old, why)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe"):
        """The checked config of a recipe mapping (older keys upgraded; an unknown key names its closest match)."""
        data = cls.upgrade_keys(data, source)
        check_config_keys(data, cls, cls.KIND, source)
        cfg = cls(**data)
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, recipe: str):
        return cls.from_dict(read_recipe(recipe), f"recipe {recipe}")

    @classmethod
    def from_saved(cls, data: dict, source: str):
        """The config saved with a model (an export or checkpoint): keys this version does not know (written by
        another one) are dropped, older names read as the new ones."""
        known = {f.name for f in dataclasses.fields(cls)} | set(cls.RENAMED_KEYS) | set(cls.IGNORED_KEYS)
        return cls.from_dict({k: v for k, v in cls.with_older_defaults(data).items() if k in known}, source)

    @classmethod
    def with_older_defaults(cls, saved: dict) -> dict:
        """A saved config with the keys it predates set to what leaving them out meant then."""
        return {**cls.OLDER_DEFAULTS, **saved}


@dataclass
class TrainConfig(RunConfig):
    """Supervised training and fine-tuning (the classify task)."""

    # model
    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    initial_checkpoint: str | None = None  # weights (ours or official) loaded before training
    head_init_scale: float | None = None  # scale the classifier after init/loading (fine-tuning: BEiT uses 0.001)
    # data
    dataset: str = "digits"  # digits | folder | lmdb | auto
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # None: taken from the dataset
    img_size: int | None = None  # None: the model's default input size
    eval_img_size: int | None = None  # validation input size (FixRes: train small, test larger); None: img_size
    world_size: int = 1  # processes the recipe was written for (documentation, lr scaling)
    # optimizer; the lr when no recipe or flag sets it follows timm's train.py: lr_base (AdamW: 1e-3, SGD: 0.1)
    # per 256 images, sqrt-scaled for adaptive optimizers (docs/from_official/README.md, "Defaults")
    opt: str = "adamw"
    lr_base: float | None = None
    lr_base_size: int = 256
    lr_base_scale: str = ""
    opt_kwargs: dict = field(default_factory=dict)
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: list | None = None
    layer_decay: float | None = None
    sched: str = "cosine"  # cosine | step | none  (updated every optimizer step)
    warmup_epochs: float = 0
    warmup_lr: float = 1e-6
    warmup_prefix: bool = False  # True: warm-up, then the decay over the remaining epochs (mmengine); False: overlay
    min_lr: float = 1e-6
    decay_epochs: float = 30  # for step
    decay_rate: float = 0.1
    # loss and augmentation
    loss: str = "ce"  # ce | bce | a family loss name (ga)
    loss_kwargs: dict = field(default_factory=dict)
    smoothing: float = 0.0
    bce_target_thresh: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    color_jitter: float | None = None
    scale: list | None = None  # RandomResizedCrop scale range; None: timm default (0.08, 1)
    train_interpolation: str = "bicubic"
    hflip: float = 0.5  # 0 for digits: they are not mirror-symmetric
    crop_pct: float | None = None  # eval center-crop fraction; None: the model's pretrained cfg
    drop_path: float | None = None
    drop: float | None = None
    aug_repeats: int = 0  # repeated augmentation (DeiT/RSB RepeatAugSampler): each image this many times per epoch
    # semi-supervised fine-tuning: train on a labelled subset of the train split only (evals/semisup.py draws it)
    label_percent: float | None = None  # keep the labels of this % of the train split; None: every image
    label_sampling: str = "balanced"  # balanced: round(p % of each class), at least 1 | random: p % uniformly
    label_subset_file: str | None = None  # file names of the subset, one a line (SimCLRv2 1percent.txt); wins

    def check(self) -> None:
        super().check()
        if self.label_percent is not None and not 0 < float(self.label_percent) <= 100:
            raise RecipeError(f"label_percent must be in (0, 100] (or unset: every image), got {self.label_percent}.")
        if self.label_sampling not in LABEL_SAMPLINGS:
            raise RecipeError(f"label_sampling {self.label_sampling!r} is not one of {', '.join(LABEL_SAMPLINGS)}.")
        # None (unset) is the one spelling of "from the data": 0 or less is refused, not silently replaced.
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise RecipeError(f"--num-classes (num_classes) must be a whole number >= 1, got {self.num_classes!r}; "
                              f"leave it out (null in a recipe) to take the class count from the data.")
        for name in ("img_size", "eval_img_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise RecipeError(f"{name} must be >= 1 (or unset: the model's input size), got {v}.")


class RecipeError(ConfigError):
    pass


def list_recipes() -> list[str]:
    """Names like ``coc/coc_tiny`` of every shipped recipe."""
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe by shipped name (``coc/coc_tiny`` or just ``coc_tiny``) or by path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise RecipeError(f"Recipe file not found: {path}")
        return path
    names = list_recipes()
    exact = [n for n in names if n == name or n.split("/")[-1] == name]
    if len(exact) == 1:
        return RECIPES_DIR / f"{exact[0]}.yaml"
    if len(exact) > 1:
        raise RecipeError(f"Recipe name '{name}' is ambiguous: {', '.join(exact)}. Give the family prefix.")
    close = difflib.get_close_matches(name, names + [n.split("/")[-1] for n in names], n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise RecipeError(f"Unknown recipe '{name}'.{hint} `visionzoo list recipes` shows every name.")


def is_pretrain_recipe(path: str | os.PathLike) -> bool:
    """Pretraining recipes (``UDIConfig`` keys, for ``visionzoo pretrain``) are named ``pretrain_*.yaml``."""
    return Path(path).name.startswith("pretrain_")


def parse_yaml(text: str, what: str) -> Any:
    """YAML with the safe loader only; a tag that would build Python objects (``!!python/...``) or a syntax error is
    one RecipeError naming ``what`` and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = (": only plain YAML values are read (no !!python tags: nothing in a recipe may run code)"
                if "python/" in str(e) else "")
        raise RecipeError(f"{what} is not valid YAML{where}: {problem}{hint}.") from None


def _coerce(value: str) -> Any:
    """Parse a CLI override value with YAML rules (numbers, bools, null, lists, dicts)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def apply_overrides(data: dict, overrides: list[str] | dict | None, cls=TrainConfig) -> dict:
    data = dict(data)
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    valid = {f.name for f in dataclasses.fields(cls)}
    for key, value in items:
        key = key.replace("-", "_")
        top, _, sub = key.partition(".")
        if top not in valid:
            close = difflib.get_close_matches(top, sorted(valid), n=3)
            raise RecipeError(f"Unknown config key '{top}'." + (f" Did you mean: {', '.join(close)}?" if close else ""))
        value = _coerce(value) if isinstance(value, str) else value
        if sub:  # dict field, e.g. model_kwargs.foo=1
            inner = dict(data.get(top) or {})
            inner[sub] = value
            data[top] = inner
        else:
            data[top] = value
    return data


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise RecipeError(f"Override '{item}' must look like key=value (e.g. epochs=5 or model_kwargs.drop_rate=0.1).")
    k, v = item.split("=", 1)
    return k.strip().lstrip("-"), v


def check_config_keys(data: dict, cls, what: str = "config", source: str = "recipe") -> None:
    """Refuse keys that are not fields of the config dataclass ``cls``, naming each with its closest valid key."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        hints = {u: difflib.get_close_matches(u, sorted(valid), n=1) for u in unknown}
        detail = ", ".join(f"{u}" + (f" (did you mean {h[0]}?)" if h else "") for u, h in hints.items())
        raise RecipeError(f"{source}: unknown {what} keys: {detail}. Valid keys: {', '.join(sorted(valid))}")


def read_recipe(recipe: str) -> dict:
    """The key: value mapping of a shipped recipe name or a YAML path."""
    path = find_recipe(recipe)
    data = parse_yaml(path.read_text(), f"Recipe {path}") or {}
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping of key: value.")
    return data


def recipe_for_official_config(config: str, folder: str) -> str:
    """The shipped recipe under ``recipes/<folder>/`` whose ``official_config`` key names the official config file
    ``config`` (a path or file name, with or without ``.py``), e.g. from an official checkpoint's ``meta.exp_name``."""
    stem = Path(str(config)).stem
    found = [f"{folder}/{p.stem}" for p in sorted((RECIPES_DIR / folder).glob("*.yaml"))
             if Path(str(read_recipe(str(p)).get("official_config") or "")).stem == stem]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise ConfigError(f"{what} {folder} recipes reproduce the official config {stem}: pass --recipe "
                          f"(visionzoo list recipes '{folder}/*').")
    return found[0]


def config_from_dict(data: dict, cls=TrainConfig):
    check_config_keys(data, cls)
    return cls(**data)


def load_config(recipe: str | None = None, overrides: list[str] | dict | None = None, cls=TrainConfig):
    data: dict = {}
    if recipe:
        path = find_recipe(recipe)
        if cls is TrainConfig and is_pretrain_recipe(path):
            raise RecipeError(f"{path.stem} is a self-supervised pretraining recipe: run "
                              f"`visionzoo pretrain --recipe {recipe}` (train/finetune take supervised recipes).")
        task_tools = {"pointcloud": ("a point-cloud", "pointcloud"), "detection": ("a detection", "detect train"),
                      "segmentation": ("a segmentation", "segment train")}
        if cls is TrainConfig and path.parent.name in task_tools:
            kind, tool = task_tools[path.parent.name]
            raise RecipeError(f"{path.stem} is {kind} recipe: run `visionzoo {tool} --recipe {recipe}`.")
        data.update(read_recipe(str(path)))
    data = apply_overrides(data, overrides, cls)
    return config_from_dict(data, cls)


def save_config(cfg, path: str | os.PathLike, extra: dict | None = None) -> None:
    data = dataclasses.asdict(cfg)
    if extra:
        data["resolved"] = extra
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def split_run_path(path: str | os.PathLike) -> dict:
    """``--out RUN`` (the run folder itself, the older spelling) as the ``output`` / ``experiment`` fields."""
    path = Path(path)
    return {"output": str(path.parent), "experiment": path.name}


# ----------------------------------------------------------------------------------------------------------------
# command-line flags generated from the config dataclasses (torch-free: the CLI builds its parsers from these)

def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """One ``--field-name`` flag per config field (timm's train.py names where they mean the same), but those in
    ``skip`` (fields a command defines with its own meaning)."""
    hints = typing.get_type_hints(cls)
    short = {"batch_size": ["-b"], "experiment": ["--exp"], "workers": ["-j"], "torchcompile": ["--compile"]}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name == "amp":
            add_amp_flag(parser, dest="cfg_amp", alone=getattr(cls, "AMP_TRUE", "bf16"))
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        kw: dict = {"dest": f"cfg_{f.name}", "default": None}
        if "bool" in hint:
            kw.update(nargs="?", const=True, type=_bool, metavar="BOOL")
        elif f.name == "torchcompile":  # timm's flag; alone it means torch.compile's default mode
            kw.update(nargs="?", const="default", type=str, metavar="MODE")
        elif "dict" in hint:  # timm's KEY=VALUE pairs, or one YAML mapping
            kw.update(type=str, nargs="+", metavar="KEY=VALUE")
        elif "list" in hint:  # timm's space-separated values, or one YAML list
            kw.update(type=str, nargs="+", metavar="VALUE")
        elif "float" in hint:
            kw.update(type=float)
        elif "int" in hint:
            kw.update(type=int)
        else:
            kw.update(type=str)
        kw.setdefault("metavar", f.name.upper())
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        kw["help"] = "the older spelling of --amp" if f.name == "amp_dtype" else f"(default: {default})"
        if f.name == "torchcompile":
            kw.update(choices=COMPILE_MODES, help="torch.compile the training step (alone: mode default)")
        parser.add_argument(*short.get(f.name, []), flag, **kw)


def config_overrides(args, cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is None:
            continue
        if "dict" in str(f.type) or "list" in str(f.type):
            v = _structured_flag(f.name, [v] if isinstance(v, str) else list(v), "dict" in str(f.type))
        out[f.name] = v
    return out


def _structured_flag(name: str, tokens: list[str], is_dict: bool):
    """The value of a dict or list flag: one YAML token (``--scale '[0.5, 1]'``), or timm's forms: values
    (``--scale 0.5 1``, ``--opt-betas 0.9 0.999``) and KEY=VALUE pairs (``--model-kwargs drop_rate=0.1``)."""
    flag = f"--{name.replace('_', '-')}"
    if len(tokens) == 1:
        value = parse_yaml(tokens[0], f"{flag} {tokens[0]!r}")
        if isinstance(value, (dict, list)) or value is None:
            return value
        if not is_dict:
            return [value]
    if is_dict:
        bad = [t for t in tokens if "=" not in t]
        if bad:
            raise ConfigError(f"{flag} takes KEY=VALUE pairs or one YAML mapping, got {bad[0]!r} (a dataset "
                              f"root goes before the flags, or after --data).")
        return {k.strip(): _coerce(v) for k, v in (t.split("=", 1) for t in tokens)}
    values = [_coerce(t) for t in tokens]
    if len({isinstance(v, (int, float)) and not isinstance(v, bool) for v in values}) > 1:
        raise ConfigError(f"{flag} {' '.join(tokens)}: mixed numbers and words (a dataset root goes before the "
                          f"flags, or after --data).")
    return values
