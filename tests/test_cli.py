"""The `visionzoo` command as a user meets it: fast help, listings, one-line errors for bad input."""
import argparse
import subprocess
import sys

import pytest

from visionzoo.cli import main


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "visionzoo", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_lists_every_command():
    # timing is not asserted (machine load varies); what matters is that torch is never imported for --help
    code = ("import sys; sys.argv[0] = '/usr/local/bin/visionzoo'  # as the console script runs\n"
            "import visionzoo.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("NOTORCH")
    for cmd in ("demo", "train", "validate", "list", "benchmark", "data", "visualize"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["train", "validate", "benchmark", "demo", "list", "visualize"])
def test_subcommand_help(cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0


def test_list_models_and_recipes(capsys):
    assert main(["list", "models", "coc*"]) == 0
    out = capsys.readouterr().out.split()
    assert "coc_tiny" in out and "coc_test" in out and not any(n.startswith("gpvit") for n in out)
    assert main(["list", "recipes"]) == 0
    assert "demo/digits" in capsys.readouterr().out


def test_unknown_model_is_one_line_with_close_matches():
    r = _run("validate", "coc_tinyy")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "coc_tiny" in r.stderr and r.stderr.startswith("error:")


def test_unknown_recipe_is_one_line_with_close_matches():
    r = _run("train", "--recipe", "demo/digit")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "demo/digits" in r.stderr


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    r = _run("train", str(missing), "--dataset", "folder", "--model", "coc_test", "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(missing) in r.stderr


def test_console_script_registers_models_before_running_a_command():
    # the console script defers model registration for a fast --help; every real command must still see our models
    code = ("import sys; sys.argv[0] = '/usr/local/bin/visionzoo'\n"
            "import visionzoo.cli as c\n"
            "sys.exit(c.main(['list', 'models', 'udi*']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "udi_vit_test" in r.stdout.split()


def test_tool_help_does_not_import_torch():
    code = ("import sys; sys.argv[0] = '/usr/local/bin/visionzoo'\n"
            "import visionzoo.cli as c\n"
            "for cmd in ('pretrain', 'knn', 'linear', 'finetune', 'transfer', 'pointcloud', 'detect', 'segment',\n"
            "            'semisup', 'videoseg'):\n"
            "    try:\n        c.main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("NOTORCH")
    for flag in ("--nb-knn", "--n-last-blocks", "--checkpoint", "--angles", "--points"):
        assert flag in out, flag


def test_the_command_lines_choices_are_the_librarys():
    """cli/tools.py repeats the library's choices (it must not import torch): both must agree."""
    from visionzoo import bench
    from visionzoo.cli import tools
    from visionzoo.dense import video
    from visionzoo.evals import features, linear, semisup, transfer
    from visionzoo.ssl import pretrain

    assert tools.TOKENS == features.TOKENS and tools.AUGMENTS == linear.AUGMENTS
    assert tools.SAMPLINGS == semisup.SAMPLINGS and tools.STYLES == video.STYLES
    assert tools.ANGLE_STATS == transfer.ANGLE_STATS and tools.DEFAULT_C_GRID == transfer.DEFAULT_C_GRID
    assert (tools.PRECISIONS, tools.BENCH_MODES) == (bench.PRECISIONS, bench.BENCH_MODES)
    assert tools.METHODS == pretrain.METHODS
    from visionzoo.cli import TOOLS

    assert all(callable(getattr(tools, name)) for name in TOOLS)


def test_profile_times_loader_and_step_of_any_task_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    commands = [["train", "--recipe", "demo/digits", "-j", "0", "--output", str(tmp_path / "runs")],
                ["segment", "train", "--recipe", "segmentation/segformer_shapes_cpu", "--out", str(tmp_path / "s"),
                 "--set", "shapes_train=24", "shapes_val=2"]]
    for cmd in commands:
        assert main(cmd + ["--profile", "2", "--device", "cpu"]) == 0, cmd
        out = capsys.readouterr().out
        m = re.search(r"loader ([\d.]+) img/s .* train step ([\d.]+) img/s over 2 batches", out)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    assert list(tmp_path.iterdir()) == []  # no run folder, no generated data left behind


@pytest.mark.parametrize("command", [["demo"], ["train"], ["finetune", "--checkpoint", "w"], ["pretrain"],
                                     ["detect", "train"], ["segment", "train"], ["pointcloud"]])
def test_out_is_the_run_folder_in_every_training_command(command):
    # one meaning of --out RUN wherever a run folder is made; before, `train --out X` reached --output (a parent
    # folder) by argparse's prefix matching and the run landed in X/<model>-<time>
    from visionzoo.cli import build_parser

    argv = command + ["--out", "runs/a"]
    args = build_parser(argv).parse_args(argv)
    assert args.out == "runs/a"


def _every_parser(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _every_parser(child)


def test_no_command_matches_a_flag_by_its_prefix():
    # a prefix is an error, not a silent other flag: `--outp X` must not become `--output X`
    from visionzoo.cli import TOOLS, build_parser

    for name in ["train", *TOOLS]:  # a tool's flags exist only in the parser built for it
        for parser in _every_parser(build_parser([name])):
            assert parser.allow_abbrev is False, parser.prog
    r = _run("train", "--model", "coc_test", "--outp", "x")
    assert r.returncode == 2 and "--outp" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_train_out_writes_the_run_into_that_folder(tmp_path, capsys):
    run = tmp_path / "runs" / "mine"
    assert main(["train", "--model", "coc_test", "--max-steps", "1", "-b", "8", "-j", "0", "--device", "cpu",
                 "--out", str(run)]) == 0
    assert (run / "summary.json").is_file() and (run / "config.yaml").is_file()
    assert [p.name for p in run.parent.iterdir()] == ["mine"]
    # the engine's last line, the same in every task: the folder and what it now holds
    done, last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "done: val_top1 " in done and "1 step, 0 epochs in" in done, done
    assert f"run folder: {run}  (" in last
    listed = last.split("  (", 1)[1].rstrip(")").split(", ")
    assert set(listed) == {p.name + "/" if p.is_dir() else p.name for p in run.iterdir() if p.name != ".lock"}
    assert {"best/", "last/", "config.yaml", "summary.json", "train_state.pt"} <= set(listed)
