"""docs/from_official/*.md cannot go stale: every command in the `visionzoo` column of their tables parses (flags,
recipe names), and runs for an epoch of tiny generated data with the family's tiny model, by the rule in
docs/from_official/README.md. The default suite parses every command and runs one page; ``-m slow`` runs them all."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from visionzoo.cli import build_parser, main

PAGES = Path(__file__).resolve().parents[1] / "docs" / "from_official"
FAMILIES = ("coc", "gpvit", "gcr", "ga", "udi")

# ---------------------------------------------------------------------------------------------------------------
# reading the pages


def page_commands(family: str) -> list[str]:
    """The commands of the `visionzoo` column of every table on the family's page, in page order."""
    commands, column = [], None
    for line in (PAGES / f"{family}.md").read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index("visionzoo") if "visionzoo" in cells else -1
            continue
        if column < 0 or column >= len(cells) or set(cells[column]) <= set("-: "):
            continue
        commands += [c for c in re.findall(r"`([^`]+)`", cells[column]) if c.startswith(("visionzoo ", "torchrun "))]
    return commands


def test_every_page_has_commands_for_every_job():
    for family in FAMILIES:
        commands = page_commands(family)
        assert len(commands) >= 5, (family, commands)
        assert any(c.startswith("torchrun ") for c in commands), f"{family}: no multi-GPU row"
        assert any(" validate " in c or " eval" in c or " knn " in c for c in commands), f"{family}: no evaluation"


# ---------------------------------------------------------------------------------------------------------------
# the rule: tiny models, generated data, one epoch on the CPU

TINY = (("gpvit", "gpvit_test"), ("coc_", "coc_test"), ("ga_", "ga_test"), ("udi_vit", "udi_vit_test"),
        ("gcr", "gcr_test"))
# speed flags per command (appended: argparse keeps the last value); "SET": items added to the command's --set
FAST = {
    "train": ["-b", "8", "-j", "0", "--epochs", "1", "--warmup-epochs", "0", "--grad-accum-steps", "1",
              "--img-size", "32", "--eval-img-size", "32", "--amp", "fp32", "--device", "cpu", "SET",
              "torchcompile=null", "num_classes=null", "aug_repeats=0"],
    "validate": ["-b", "8", "--workers", "0", "--device", "cpu"],
    "visualize": [],
    "data": ["--quiet"],
    "pretrain": ["--max-train-images", "8", "-b", "4", "-j", "0", "--epochs", "1", "--global-size", "32",
                 "--local-size", "16", "--local-crops-number", "2", "--out-dim", "64", "--head-hidden-dim", "32",
                 "--head-bottleneck-dim", "16", "--warmup-epochs", "0", "--warmup-teacher-temp-epochs", "0",
                 "--knn-max-train", "20", "--knn-max-val", "20", "--amp", "fp32", "--device", "cpu",
                 "--save-every-epochs", "0"],
    "knn": ["--workers", "0", "--device", "cpu", "-b", "16", "-k", "5"],
    "linear": ["--workers", "0", "--device", "cpu", "--epochs", "1", "-b", "8"],
    "semisup": ["--workers", "0", "--device", "cpu", "--max-iter", "20"],
    "videoseg": ["--device", "cpu", "--short-side", "0", "--size-multiple", "16", "--n-last-frames", "2"],
    "transfer": ["--workers", "0", "--device", "cpu", "-b", "16", "--c-grid", "1.0"],
    "pointcloud": ["--small", "--points", "128", "--epochs", "1", "--max-steps", "2", "-b", "8", "--device", "cpu",
                   "SET", "num_classes=null"],
    "detect train": ["--epochs", "1", "-b", "2", "--device", "cpu", "--amp", "fp32", "--workers", "0", "SET",
                     "img_scale=[64, 64]", "fpn_channels=16", "representation_size=32", "rpn_batch_size_per_image=32",
                     "box_batch_size_per_image=32", "detections_per_img=20", "warmup_iters=1", "sync_bn=false",
                     "log_interval=1"],
    "detect eval": ["--device", "cpu", "--max-images", "2"],
    "segment train": ["--steps", "2", "-b", "2", "--device", "cpu", "--amp", "fp32", "--workers", "0", "SET",
                      "crop_size=[32, 32]", "img_scale=[64, 32]", "eval_every_steps=2", "checkpoint_every_steps=null",
                      "warmup_iters=1", "log_interval=1", "sync_bn=false"],
    "segment eval": ["--device", "cpu", "-j", "0"],
}
FAST["finetune"] = FAST["train"]
# what a tiny model needs beyond FAST: (command, tiny model) -> flags ("SET": --set items)
BLOCKS_OF_TINY = ["SET", "out_indices=[0, 1, 1, 2]"]  # the tiny ViTs have 3 blocks, not 12
TINY_FIXES = {("segment train", "gpvit_test"): BLOCKS_OF_TINY + ["aux_index=2"],  # UperNet's auxiliary map ("segment train", "udi_vit_test"): BLOCKS_OF_TINY,
              ("detect train", "udi_vit_test"): BLOCKS_OF_TINY,  # (GPViT's adapter neck has its own levels)
              ("visualize", "gpvit_test"): ["--layer", "1"]}  # its one GP block
MODEL_FLAG = ("train", "finetune", "pretrain", "detect train", "segment train")  # take --model after a recipe


def tiny_model(name: str) -> str:
    return next((tiny for key, tiny in TINY if key in name), "test_resnet")


def to_argv(command: str) -> list[str]:
    """``visionzoo ARGS`` -> ARGS; ``torchrun [opts] -m visionzoo ARGS`` -> ARGS (one process)."""
    tokens = shlex.split(command)
    if tokens[0] == "torchrun":
        tokens = tokens[tokens.index("-m") + 1:]
    assert tokens[0] == "visionzoo", command
    return tokens[1:]


def command_name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("detect", "segment") else argv[0]


class Sandbox:
    """Generated stand-ins for the pages' placeholders, made on first use in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, str] = {}

    def path(self, placeholder: str) -> str:
        if placeholder not in self._made:
            self._made[placeholder] = str(getattr(self, "_" + re.sub(r"\W", "_", placeholder.strip("/")))())
        return self._made[placeholder]

    def _data_imagenet(self):
        from visionzoo.data.datasets import write_digits_folder

        return write_digits_folder(self.root / "imagenet", max_per_class=5)  # transfer holds out 20%: 10 images

    def _data_imagenet_lmdb(self):
        return self.root / "imagenet-lmdb"  # written by the pages' `data to-lmdb` rows

    def _data_coco(self):
        from visionzoo.dense.shapes import write_coco

        return write_coco(self.root / "coco", n_train=4, n_val=2, size=(64, 64), seed=0)

    def _data_ade20k(self):
        from visionzoo.dense.shapes import write_ade20k

        return write_ade20k(self.root / "ade20k", n_train=4, n_val=2, size=(64, 64))

    def _data_DAVIS(self):
        root = self.root / "davis"
        assert main(["videoseg", "make-data", str(root), "--sequences-count", "1", "--frames", "4", "--size", "32",
                     "48"]) == 0
        return root

    def _photo_jpg(self):
        from PIL import Image

        digit = sorted(Path(self.path("/data/imagenet"), "val").rglob("*.png"))[0]
        Image.open(digit).convert("RGB").save(self.root / "photo.jpg")
        return self.root / "photo.jpg"

    def official_checkpoint(self, name: str, model: str) -> str:
        """The tiny model's weights in the official wrapper, as the file the page names."""
        import torch

        import visionzoo

        path = self.root / name
        if not path.exists():
            torch.save({"state_dict": visionzoo.create_model(model).state_dict()}, path)
        return str(path)


PLACEHOLDERS = ("/data/imagenet-lmdb", "/data/imagenet", "/data/coco", "/data/ade20k", "/data/DAVIS", "photo.jpg")


def model_positions(argv: list[str], name: str) -> list[int]:
    """Where ``argv`` names models: after --model/-m (every value for transfer), validate's first argument."""
    if name == "pointcloud":  # coc_pointmlp has no tiny variant: --small shrinks it
        return []
    found = [1] if name == "validate" and not argv[1].startswith("runs/") else []
    for i, token in enumerate(argv):
        if token in ("--model", "-m"):
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                found.append(j)
                j += 1
    return found


def translate(command: str, box: Sandbox | None) -> list[str]:
    """The command as the test runs it (``box`` None: parse only, placeholders kept)."""
    argv = to_argv(command)
    name = command_name(argv)
    out = list(argv)
    models = model_positions(argv, name)
    for i in models:
        out[i] = tiny_model(argv[i])
    if name in MODEL_FLAG and not models and "--recipe" in argv:
        from visionzoo.engine.config import read_recipe

        out += ["--model", tiny_model(str(read_recipe(argv[argv.index("--recipe") + 1]).get("model", "")))]
    if box is None:
        return out
    for i, token in enumerate(out):
        if token.startswith("scanobjectnn:"):
            out[i] = "shapes"
        elif token.endswith((".pth", ".pth.tar")) and out[i - 1] == "--checkpoint":
            out[i] = box.official_checkpoint(token, out[models[0]])
        else:
            p = next((p for p in PLACEHOLDERS if token == p or token.startswith(p + "/")), None)
            if p is not None:
                out[i] = box.path(p) + token[len(p):]
    fast = list(FAST.get(name, []))
    model = out[models[0]] if models else out[-1] if out[-2:-1] == ["--model"] else None
    fix = TINY_FIXES.get((name, model), [])
    if "SET" in fix:
        fast = fix[:fix.index("SET")] + fast + (fix[fix.index("SET") + 1:] if "SET" in fast else
                                                ["SET", *fix[fix.index("SET") + 1:]])
    else:
        fast = fix + fast
    if "SET" in fast:
        fast, items = fast[:fast.index("SET")], fast[fast.index("SET") + 1:]
        if "--set" in out:
            at = out.index("--set") + 1
            out[at:at] = items
        else:
            fast += ["--set", *items]
    return out + fast


# ---------------------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_parses(family):
    """Flags and recipe names of every command: a renamed flag or recipe fails here, in the default suite."""
    from visionzoo.engine.config import find_recipe

    for command in page_commands(family):
        argv = translate(command, None)
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{command!r} does not parse (exit {e.code})")
        if "--recipe" in argv:
            find_recipe(argv[argv.index("--recipe") + 1])


def _run(commands: list[str], root: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(root)  # the pages' runs/NAME folders are relative
    box = Sandbox(root)
    for command in commands:
        argv = translate(command, box)
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"{command!r}\n-> visionzoo {shlex.join(argv)}\n{captured.err[-2000:]}"


def _needs_no_training(command: str) -> bool:
    argv = to_argv(command)
    return argv[0] in ("data", "validate", "visualize", "list") and not any(t.startswith("runs/") for t in argv)


def test_commands_without_training_run(tmp_path, monkeypatch, capsys):
    """The default suite runs what needs no trained run: LMDB conversion, official checkpoints, visualization."""
    ran = 0
    for family in FAMILIES:
        commands = [c for c in page_commands(family) if _needs_no_training(c)]
        (tmp_path / family).mkdir()
        _run(commands, tmp_path / family, monkeypatch, capsys)
        ran += len(commands)
    assert ran >= 6


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_page_runs(family, tmp_path, monkeypatch, capsys):
    """Every row of the page, in order (later rows read the run folders earlier rows wrote)."""
    _run(page_commands(family), tmp_path, monkeypatch, capsys)


def test_a_pretrain_runs_two_class_tokens_load_into_the_fine_tuned_vit():
    """The udi.md fine-tune rows: our [CLS]+[CLS+] state dict (a `visionzoo pretrain` run) loads into the one-token
    ViT that `udi/finetune_vit_*` builds (reg_tokens 0): [CLS+] and its position row are dropped."""
    import torch

    import visionzoo
    from visionzoo.models.vit_udi import checkpoint_filter_fn

    pretrained = visionzoo.create_model("udi_vit_test")
    one_token = visionzoo.create_model("udi_vit_test", reg_tokens=0)
    sd = checkpoint_filter_fn(pretrained.state_dict(), one_token)
    assert "reg_token" not in sd and sd["pos_embed"].shape == one_token.pos_embed.shape
    pe = pretrained.pos_embed
    assert torch.equal(sd["pos_embed"], torch.cat([pe[:, :1], pe[:, 2:]], dim=1))
    one_token.load_state_dict(sd)
