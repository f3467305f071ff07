"""torch.compile: every family's forward is one graph (``torch._dynamo.explain`` finds no break, in eval and train
mode) and the compiled model computes what the eager one does; ``--torchcompile`` (``--compile``) runs each task's
training step compiled through the engine. Compiling takes minutes on 2 CPU cores, so those tests are ``slow``."""
import copy

import pytest
import torch

import visionzoo
from visionzoo.cli import main

# one small model per registered family (module of visionzoo.models), with its input
FAMILY_MODELS = {
    "coc_test": {},  # context_cluster
    "coc_pointmlp": dict(points=128, embed_dim=16, dim_expansion=(2, 2), pre_blocks=(1, 1), pos_blocks=(1, 1),
                         k_neighbors=(8, 8), reducers=(4, 4)),  # coc_pointmlp (point clouds)
    "gpvit_test": {},  # gpvit
    "cswin_test": {},  # cswin
    "ga_test": {},  # gramian
    "gcr_test": {},  # grassmann
    "udi_vit_test": {},  # vit_udi
}


def _model_and_input(name: str):
    torch.manual_seed(0)
    model = visionzoo.create_model(name, **FAMILY_MODELS[name])
    if name == "coc_pointmlp":
        return model, torch.randn(2, 3, 128)
    return model, torch.randn(2, *model.pretrained_cfg["input_size"])


def test_every_family_has_a_model():
    from visionzoo.models import _registry

    families = {visionzoo.models.model_entrypoint(n).__module__.rsplit(".", 1)[-1] for n in FAMILY_MODELS}
    assert families == set(_registry.FAMILY_MODULES)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_forward_is_one_graph(name, mode):
    torch._dynamo.reset()
    model, x = _model_and_input(name)
    model.train(mode == "train")
    explained = torch._dynamo.explain(model)(x)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons[:3]
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_compiled_matches_eager(name):
    torch._dynamo.reset()
    model, x = _model_and_input(name)
    for m in model.modules():  # compiled dropout draws other random numbers than eager (coc_pointmlp's head)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for mode in ("eval", "train"):  # train: batch statistics, BN running-stat updates
        eager = copy.deepcopy(model).train(mode == "train")
        compiled = torch.compile(copy.deepcopy(model).train(mode == "train"))
        ref, out = eager(x), compiled(x)
        # fused kernels sum in another order: fp32 rounding differences up to ~5e-4 on these logits (GCR's)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        if mode == "train":  # the compiled backward gives the eager gradients
            ref.float().square().mean().backward()
            out.float().square().mean().backward()
            # each gradient against its own norm (plus 1e-3 of the whole one: a gradient that BatchNorm makes ~0,
            # such as a bias before it, is all rounding); fp32 rounding of the fused kernels, amplified by batch-2
            # BatchNorm, reaches ~2e-3 (coc_pointmlp; the same check in float64: 2e-11), a real error is O(1)
            grads = [(n, p.grad, q.grad) for (n, p), q in zip(eager.named_parameters(), compiled.parameters())
                     if p.grad is not None]
            total = torch.cat([g.flatten() for _, g, _ in grads]).norm()
            for n, g, h in grads:
                err = float((h - g).norm() / (g.norm() + 1e-3 * total))
                assert err < 5e-3, f"{n}: relative gradient error {err:.2e}"


def test_bad_compile_mode_is_one_line(tmp_path, capsys):
    from visionzoo.engine.config import TrainConfig
    from visionzoo.errors import UserError

    argv = ["train", "--recipe", "coc/coc_test_cpu", "--max-steps", "1", "--output", str(tmp_path), "--device",
            "cpu", "--compile", "fastest"]
    with pytest.raises(SystemExit) as stop:  # the flag: argparse's one-line usage error
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "fastest" in err and "max-autotune" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="torchcompile='fastest'.*max-autotune"):  # a recipe or --set value
        TrainConfig(torchcompile="fastest").check()
    TrainConfig(torchcompile="default").check()


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


TASK_RUNS = {  # two compiled training steps of each task, from its CPU recipe
    "train": ["train", "--recipe", "coc/coc_test_cpu", "--epochs", "1"],
    "pretrain": ["pretrain", "--recipe", "udi/pretrain_vit_test_cpu", "--epochs", "1", "--workers", "0"],
    "detect": ["detect", "train", "--recipe", "detection/maskrcnn_shapes_cpu", "--epochs", "1"],
    "segment": ["segment", "train", "--recipe", "segmentation/semfpn_shapes_cpu"],
    "pointcloud": ["pointcloud", "--recipe", "pointcloud/coc_pointmlp_shapes_cpu", "--epochs", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_RUNS))
def test_task_trains_compiled(task, tmp_path):
    torch._dynamo.reset()
    before = _graphs_compiled()
    argv = TASK_RUNS[task] + ["--max-steps", "2", "--output", str(tmp_path / "run"), "--device", "cpu", "--compile"]
    assert main(argv) == 0
    assert _graphs_compiled() > before  # the step ran through torch.compile


def test_udi_compiled_step_keeps_one_graph_across_epochs(tmp_path, monkeypatch):
    # the teacher temperature changes every warm-up epoch (5 here): it reaches the compiled step as a tensor, so
    # the step is traced once for all 3 epochs (a Python float would be a new constant, so a recompile, each epoch)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend=counter))
    argv = ["pretrain", "--recipe", "udi/pretrain_vit_test_cpu", "--epochs", "3", "--max-train-images", "8",
            "--batch-size", "4", "--online-knn", "false", "--workers", "0", "--output", str(tmp_path / "run"),
            "--device", "cpu", "--compile"]
    assert main(argv) == 0
    assert counter.frame_count == 1  # one graph, compiled once, for the 6 steps of 3 epochs
