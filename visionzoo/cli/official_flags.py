"""Flags that the official scripts (and timm's train.py) spell differently: one table, read when argparse finds
arguments it does not know, so that ``--GA_lam -0.8`` ends in "use --loss ga --set loss_kwargs.lam=-0.8" instead of
a bare "unrecognized arguments". Torch-free (the parser imports it). The pages docs/from_official/*.md put whole
commands side by side; this table is the flag-by-flag version of them.

A value in a replacement is written ``{value}`` (the value the user gave); ``None`` means the flag takes no value.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Official:
    use: str  # what to write instead ("{value}": the value given), or why there is nothing to write
    source: str  # whose flag it is
    takes_value: bool = True
    supported: bool = True  # False: no equivalent here, ``use`` says why / what comes closest


_GA = "GA's train.py"
_COC = "CoC's train.py"
_DINO = "UDI's scripts"
_MM = "the MM-series tools (GPViT, GCR)"
_TIMM = "timm's train.py"
_LAUNCH = "torch.distributed.launch"

# flag -> Official, for every command (COMMAND_FLAGS below adds the ones that differ per command)
FLAGS: dict[str, Official] = {
    # GA README (Lab-LVM GA/train.py, a fork of timm 0.5.4's)
    "--GA_lam": Official("--loss ga --set loss_kwargs.lam={value}", _GA),
    "--grad-accumulation": Official("--grad-accum-steps {value}", _GA),
    "--master_port": Official("torchrun --master-port {value} --nproc_per_node N -m visionzoo ...", _LAUNCH),
    "--local_rank": Official("launch with `torchrun --nproc_per_node N -m visionzoo ...` (it passes no "
                             "--local_rank)", _LAUNCH),
    "--local-rank": Official("launch with `torchrun --nproc_per_node N -m visionzoo ...` (it passes no "
                             "--local-rank)", _LAUNCH),
    # CoC README (timm 0.6.13's train.py)
    "--data_dir": Official("--data {value}", _COC),
    # UDI README (DINO-style scripts: main_udi.py, eval_knn.py, eval_linear.py, eval_finetuning.py)
    "--data_path": Official("--data {value}", _DINO),
    "--output_dir": Official("--out {value}", _DINO),
    "--arch": Official("--model udi_{value}_patch16 (visionzoo list models 'udi*')", _DINO),
    "--pretrained_weights": Official("--checkpoint {value} (an official UDI checkpoint: its teacher is used)", _DINO),
    "--batch_size_per_gpu": Official("-b {value} (per process)", _DINO),
    "--batch_size": Official("-b {value} (per process)", _DINO),
    "--finetune": Official("--checkpoint {value} (a pretrain run folder or an official checkpoint: no "
                           "extract_backbone_weights step is needed)", _DINO),
    "--checkpoint_key": Official("nothing: the teacher of a UDI checkpoint is used", _DINO),
    "--layer_scale_init_value": Official("nothing: --recipe udi/finetune_vit_small builds the fine-tuned ViT "
                                         "(no layer scale)", _DINO),
    "--disable_rel_pos_bias": Official("nothing: the fine-tuned ViT has no relative position bias", _DINO, False),
    "--abs_pos_emb": Official("nothing: the fine-tuned ViT keeps its absolute position embedding", _DINO, False),
    "--use_cls": Official("nothing: the fine-tuned ViT classifies its [CLS] token", _DINO, False),
    "--imagenet_default_mean_and_std": Official("nothing: the model's own mean/std (ImageNet's) are used", _DINO,
                                                False),
    # mmcls / mmdet / mmseg train.py and test.py (GPViT, GCR): tools/dist_train.sh CONFIG GPUS [flags]
    "--cfg-options": Official("--set {value}", _MM),
    "--options": Official("--set {value}", _MM),
    "--work-dir": Official("--output {value} --experiment NAME (detect/segment/pointcloud: --out RUN)", _MM),
    "--launcher": Official("launch with `torchrun --nproc_per_node N -m visionzoo ...` (no --launcher)", _MM),
    "--metrics": Official("nothing: `visionzoo validate` always prints top-1 and top-5", _MM),
    "--eval": Official("nothing: `detect eval` prints box (and mask) AP, `segment eval` prints mIoU", _MM),
    "--deterministic": Official("nothing: every run is seeded (--seed; each step's randomness is a function of "
                                "seed, rank and step)", _MM, False),
    "--no-validate": Official("--eval-every N (epochs between evaluations)", _MM, False),
    "--resume-from": Official("--resume {value} (a run folder)", _MM),
    "--load-from": Official("--initial-checkpoint {value}", _MM),
    # timm's train.py flags with another spelling here
    "--drop-connect": Official("--drop-path {value}", _TIMM),
    "--pretrained-path": Official("--initial-checkpoint {value}", _TIMM),
    "--gp": Official("--set model_kwargs.global_pool={value}", _TIMM),
    "--recovery-interval": Official("--checkpoint-every-steps {value}", _TIMM),
    "--torchscript": Official("--torchcompile (TorchScript is not used)", _TIMM, False),
    "--torchcompile-mode": Official("--torchcompile {value}", _TIMM),
    "--model-dtype": Official("--amp bf16 (autocast; weights stay float32)", _TIMM),
    "--amp-impl": Official("--amp (native torch autocast only)", _TIMM),
    "--no-resume-opt": Official("--initial-checkpoint W (weights only) instead of --resume", _TIMM, False),
    "--start-epoch": Official("--resume RUN (the run folder knows its epoch and step)", _TIMM),
    "-vb": Official("-b (validation uses the training batch size)", _TIMM),
    "--validation-batch-size": Official("-b (validation uses the training batch size)", _TIMM),
    "--eval-metric": Official("nothing: best/ is the epoch with the highest val top-1", _TIMM),
    "--checkpoint-hist": Official("nothing: a run keeps last/, best/ and one train_state.pt", _TIMM),
    "--log-wandb": Official("metrics.csv and TensorBoard (when installed) in the run folder", _TIMM, False, False),
    "--pin-mem": Official("nothing: the loader pins memory when it feeds a GPU", _TIMM, False),
    "--no-prefetcher": Official("nothing: there is no prefetcher to turn off", _TIMM, False),
    "--worker-seeding": Official("nothing: each sample's augmentation is a function of (seed, epoch, index)", _TIMM),
    # timm's train.py flags with no equivalent here
    **{flag: Official("not supported by visionzoo train (see visionzoo train --help)", _TIMM, takes, False)
       for flag, takes in (("--cooldown-epochs", True), ("--patience-epochs", True), ("--decay-milestones", True),
                           ("--lr-noise", True), ("--lr-noise-pct", True), ("--lr-noise-std", True),
                           ("--lr-cycle-mul", True), ("--lr-cycle-decay", True), ("--lr-cycle-limit", True),
                           ("--lr-k-decay", True), ("--epoch-repeats", True), ("--mixup-off-epoch", True),
                           ("--jsd-loss", False), ("--aug-splits", True), ("--split-bn", False), ("--dist-bn", True),
                           ("--resplit", False), ("--recount", True), ("--bce-sum", False),
                           ("--bce-pos-weight", True), ("--ratio", True), ("--vflip", True), ("--no-aug", False),
                           ("--color-jitter-prob", True), ("--grayscale-prob", True),
                           ("--gaussian-blur-prob", True), ("--train-crop-mode", True), ("--cutmix-minmax", True),
                           ("--mean", True), ("--std", True), ("--interpolation", True), ("--class-map", True),
                           ("--dataset-download", False), ("--tta", True), ("--grad-checkpointing", False),
                           ("--fast-norm", False), ("--fuser", True), ("--head-init-bias", True),
                           ("--bn-momentum", True), ("--bn-eps", True), ("--in-chans", True),
                           ("--drop-block", True), ("--model-ema-force-cpu", False), ("--save-images", False),
                           ("--synchronize-step", False), ("--no-ddp-bb", False), ("--device-modules", True),
                           ("--train-num-samples", True), ("--val-num-samples", True), ("--input-img-mode", True),
                           ("--input-key", True), ("--target-key", True), ("--use-multi-epochs-loader", False))},
}

# (command, flag) -> Official, where a command spells a flag differently from the others
COMMAND_FLAGS: dict[tuple[str, str], Official] = {
    ("validate", "--model"): Official("the model first: visionzoo validate {value} --checkpoint W --dataset auto "
                                      "--data-dir ROOT", "timm's validate.py"),
    ("validate", "--data"): Official("--dataset auto --data-dir {value}", "timm's validate.py"),
    ("validate", "--data_dir"): Official("--dataset auto --data-dir {value}", _COC),
    ("validate", "--data_path"): Official("--dataset auto --data-dir {value}", _DINO),
}


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)  # a negative number is a value (--GA_lam -0.8)
        return False
    except ValueError:
        return True


def explain(tokens: list[str], command: str | None, known: list[str]) -> str | None:
    """One message for the unrecognised ``tokens`` of ``command`` whose parser has the options ``known``: what each
    official or timm flag is here. ``None`` when no token is a flag this module can say anything about."""
    notes, unknown, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        if not _looks_like_flag(token):
            unknown.append(token)
            i += 1
            continue
        flag, eq, inline = token.partition("=")
        entry = COMMAND_FLAGS.get((command or "", flag)) or FLAGS.get(flag)
        if entry is None and "_" in flag and flag.replace("_", "-") in known:
            entry = Official(flag.replace("_", "-") + " {value}", "the official scripts")  # DINO-style underscores
        value = inline if eq else None
        if entry is not None and entry.takes_value and value is None and i + 1 < len(tokens) \
                and not _looks_like_flag(tokens[i + 1]):
            value = tokens[i + 1]
            i += 1
        i += 1
        if entry is None:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            unknown.append(flag + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        use = entry.use.replace("{value}", value if value is not None else "VALUE")
        verb = "use " if entry.supported and use.startswith(("-", "torchrun ")) else ""
        notes.append(f"{flag} ({entry.source}): {verb}{use}")
    if not notes and not any("did you mean" in u for u in unknown):
        return None
    parts = notes + ([f"unrecognized arguments: {' '.join(unknown)}"] if unknown else [])
    return "; ".join(parts)


def known_options(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, list[str]]:
    """The (sub)command ``argv`` runs (``detect train`` as ``detect train``) and its parser's option strings."""
    names: list[str] = []
    for token in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or token.startswith("-"):
            continue
        sub = actions[0].choices.get(token)
        if sub is None:
            break
        names.append(token)
        parser = sub
    options = [s for a in parser._actions for s in a.option_strings]
    return (" ".join(names) or None), options


# ----------------------------------------------------------------------------------------------------------------
# timm's train.py flags accepted as they are (the config field they set is named in the help)

class _BceLoss(argparse.Action):
    """``--bce-loss``: loss bce, unless a BCE-based loss (``--loss ga``) is chosen too (GA's README passes both)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) in (None, "ce"):
            setattr(namespace, self.dest, "bce")


class _InputSize(argparse.Action):
    """``--input-size C H W``: img_size H (square inputs only)."""

    def __call__(self, parser, namespace, values, option_string=None):
        channels, height, width = values
        if channels != 3 or height != width:
            parser.error(f"--input-size {channels} {height} {width}: only 3-channel square inputs; use --img-size "
                         f"{height}")
        setattr(namespace, self.dest, height)


def add_timm_aliases(parser: argparse.ArgumentParser, cls) -> None:
    """timm's spellings of fields of ``cls`` that our generated flags name otherwise."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    if "loss" in fields:
        parser.add_argument("--bce-loss", nargs=0, action=_BceLoss, dest="cfg_loss",
                            help="timm's spelling of --loss bce (kept with --loss ga)")
    if "img_size" in fields:
        parser.add_argument("--input-size", nargs=3, type=int, action=_InputSize, dest="cfg_img_size",
                            metavar=("C", "H", "W"), help="timm's spelling of --img-size H (square inputs)")
    if "sched" in fields:
        parser.add_argument("--sched-on-updates", action="store_true", dest="timm_sched_on_updates",
                            help="accepted for timm's train.py: schedules here always step per optimizer update")
