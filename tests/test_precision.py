"""Precision: one spelling (--amp auto|bf16|fp16|fp32) in every command, what it resolves to on a device, the run
header, the fp32 islands of GCR / GA / UDI under bf16 autocast, and (GPU) one AMP step of every task."""
import copy
import logging
from pathlib import Path

import pytest
import timm
import torch
from torch.overrides import TorchFunctionMode

import visionzoo
from visionzoo.cli import build_parser
from visionzoo.engine import precision as prec
from visionzoo.engine.config import AMP_CHOICES, ConfigError, TrainConfig, amp_name, load_config

# ----------------------------------------------------------------------------------------------------------------
# spelling


@pytest.mark.parametrize("value, name", [
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("amp_bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
    ("fp32", "fp32"), ("float32", "fp32"), ("none", "fp32"), (None, "fp32"), (False, "fp32"), ("false", "fp32"),
    ("auto", "auto"), ("AUTO", "auto"), (True, "bf16"), ("true", "bf16")])
def test_every_spelling_reads_as_one_name(value, name):
    assert amp_name(value) == name


def test_an_unknown_precision_is_one_error_naming_the_choices():
    with pytest.raises(ConfigError, match="auto, bf16, fp16, fp32"):
        amp_name("int8")
    with pytest.raises(ConfigError, match="int8"):
        TrainConfig(amp="int8")


def test_older_amp_keys_fold_into_amp(caplog):
    from visionzoo.dense.detection.config import DetectionConfig
    from visionzoo.ssl.udi.config import UDIConfig

    with caplog.at_level(logging.INFO, logger="visionzoo"):
        assert TrainConfig(amp=True, amp_dtype="float16").amp == "fp16"
    assert "now spelled amp: fp16" in caplog.text
    assert TrainConfig(amp=True).amp == "bf16" and TrainConfig(amp=False, amp_dtype="bfloat16").amp == "fp32"
    assert TrainConfig(amp="bf16", amp_dtype="float16").amp == "fp16"  # the older key still picks the dtype
    assert UDIConfig(amp=True).amp == "fp16" and DetectionConfig(amp=True).amp == "fp16"  # their older defaults
    cfg = load_config("gpvit/gpvit_l1")  # amp: true + amp_dtype: float16 in the YAML
    assert (cfg.amp, cfg.amp_dtype) == ("fp16", None)
    assert load_config("demo/digits", ["amp=bfloat16"]).amp == "bf16"
    assert load_config("demo/digits", ["amp_dtype=float16", "amp=true"]).amp == "fp16"


# ----------------------------------------------------------------------------------------------------------------
# the flag in every command that runs a model

COMMANDS = [
    ["demo"], ["train"], ["finetune", "--checkpoint", "w"], ["pretrain"], ["validate", "coc_test"],
    ["knn", "--data", "digits"], ["linear", "--data", "digits"], ["semisup", "--data", "digits"],
    ["transfer", "--model", "coc_test", "--datasets", "digits", "--out", "o"],
    ["detect", "train"], ["detect", "eval", "--checkpoint", "r"], ["detect", "visualize", "--checkpoint", "r",
                                                                   "--image", "i", "--out", "o"],
    ["segment", "train"], ["segment", "eval", "--checkpoint", "r"], ["segment", "visualize", "--checkpoint", "r",
                                                                     "--image", "i", "--out", "o"],
    ["pointcloud"], ["visualize", "clusters", "--model", "coc_test"], ["visualize", "groups", "--model", "g"],
    ["visualize", "attention", "--model", "v"], ["benchmark"], ["videoseg", "eval", "--data", "d", "--out", "o"],
]


def _amp_of(args):
    amp = getattr(args, "cfg_amp", None) or getattr(args, "amp", None)
    return amp[0] if isinstance(amp, list) and len(amp) == 1 else amp  # benchmark: a list (--amp fp32 bf16)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_amp_flag_is_spelled_the_same_everywhere(argv):
    for name in AMP_CHOICES:
        full = argv + ["--amp", name]
        assert _amp_of(build_parser(full).parse_args(full)) == name
    full = argv + ["--amp", "bfloat16"]  # an older spelling reads as the one name
    assert _amp_of(build_parser(full).parse_args(full)) == "bf16"
    full = argv + ["--amp"]  # alone: the command's low precision (bf16; fp16 where the recipes meant fp16)
    assert _amp_of(build_parser(full).parse_args(full)) in ("bf16", "fp16")


def test_a_bad_amp_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser(["train"]).parse_args(["train", "--amp", "int8"])
    assert e.value.code == 2
    assert "auto, bf16, fp16, fp32" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# what a name means on a device


def test_native_bf16_is_onednns_check():
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert prec.native_bf16("cpu") == bool(expected)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(prec, "_native_bf16_cpu", lambda: native)
    cpu = torch.device("cpu")
    assert prec.amp_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert prec.describe("auto", cpu) == ("bf16 autocast (amp auto: native bf16 on cpu)" if native
                                          else "fp32 (amp auto: no native bf16 on cpu)")
    assert prec.amp_dtype("bf16", cpu) == torch.bfloat16  # asked for by name: bf16 either way


def test_fp16_on_a_cpu_runs_fp32_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="visionzoo"):
        p = prec.Precision(torch.device("cpu"), "fp16")
    assert not p.enabled and p.scaler is None and "fp16 needs CUDA" in caplog.text
    assert p.describe() == "fp32 (amp fp16 needs CUDA)"


def test_bf16_precision_autocasts_matmuls_without_a_scaler():
    p = prec.Precision(torch.device("cpu"), "bf16")
    assert p.enabled and p.scaler is None and p.describe() == "bf16 autocast"
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with prec.Precision(torch.device("cpu"), "fp32").autocast():
        assert (a @ a).dtype == torch.float32


class _Probe(torch.nn.Module):
    """Records the autocast state its forward ran under."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = torch.nn.Linear(4, 3), []

    def forward_features(self, x):
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.lin(x)

    def forward_head(self, x, pre_logits=False):
        return x


def test_feature_extraction_runs_in_the_precision_asked_for():
    from visionzoo.evals.features import extract

    model, loader = _Probe(), [(torch.randn(2, 4), torch.tensor([0, 1]))] * 2
    feats, _ = extract(model, loader, "cpu", token="pooled", amp="bf16")
    assert model.seen == [torch.bfloat16] * 2 and feats.dtype == torch.float32
    model.seen.clear()
    extract(model, loader, "cpu", token="pooled")
    assert model.seen == [None, None]


def test_the_run_header_states_the_precision(tmp_path, caplog):
    from visionzoo.tasks.classify import train

    cfg = TrainConfig(model="test_resnet", dataset="digits", img_size=32, epochs=1, batch_size=64, max_steps=1,
                      workers=0, output=str(tmp_path), experiment="bf16", amp="bf16", log_interval=1)
    with caplog.at_level(logging.INFO, logger="visionzoo"):
        summary = train(cfg)
    header = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("classify:"))
    assert "bf16 autocast" in header
    saved = (Path(summary["run_dir"]) / "config.yaml").read_text()
    assert "amp: bf16" in saved


# ----------------------------------------------------------------------------------------------------------------
# fp32 islands under bf16 autocast


class _Calls(TorchFunctionMode):
    """Every call of the functions named in ``names``: (name, dtypes of its tensor arguments, autocast on)."""

    def __init__(self, *names):
        super().__init__()
        self.names, self.calls = names, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.calls.append((name, dtypes, torch.is_autocast_enabled("cpu")))
        return func(*args, **(kwargs or {}))


def _relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_ga_gram_matrices_are_accumulated_in_fp32_under_autocast():
    torch.manual_seed(0)
    model = visionzoo.create_model("ga_test").eval()
    heads = model.heads
    y = torch.randn(2, heads.num_branches * heads.gram_dim, 4, 4)
    with torch.no_grad():
        ref = heads.gram_vector(y)
        with torch.autocast("cpu", dtype=torch.bfloat16), _Calls("bmm") as rec:
            low = heads.gram_vector(y.bfloat16())
    assert rec.calls and all(not on and set(d) <= {torch.float32, torch.float64} for _, d, on in rec.calls)
    assert low.dtype == torch.bfloat16  # handed back in the embedding's dtype
    assert _relative_error(low, ref) < 1e-2


def test_gcr_riemannian_step_and_orthonormalisation_are_fp32_under_autocast():
    from visionzoo.models.grassmann import GrassmannHead
    from visionzoo.optim.grassmann import create_grassmann_optimizer

    torch.manual_seed(0)
    head = GrassmannHead(32, 6, dim=4)
    twin = copy.deepcopy(head)
    head.weight.grad = torch.randn_like(head.weight)
    twin.weight.grad = head.weight.grad.clone()
    outside = create_grassmann_optimizer(head, "sgd", lr=0.5, reorth_step=1)
    inside = create_grassmann_optimizer(twin, "sgd", lr=0.5, reorth_step=1)
    outside.step()
    with torch.autocast("cpu", dtype=torch.bfloat16), _Calls("matmul", "linalg_svd", "linalg_qr") as rec:
        inside.step()
    assert {n for n, _, _ in rec.calls} == {"matmul", "linalg_svd", "linalg_qr"}
    assert not any(on for _, _, on in rec.calls)
    torch.testing.assert_close(twin.weight, head.weight, atol=1e-6, rtol=0)
    bases = twin.subspaces()
    eye = torch.eye(4).expand(6, 4, 4)
    torch.testing.assert_close(bases.transpose(1, 2) @ bases, eye, atol=1e-5, rtol=0)


def _udi_outputs(B=4, S=9, K=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    mask = torch.ones(1, 2 * B, S, 1)
    s = {"g_cls": r(2 * B, 1, K), "g_clsp": r(2 * B, 1, K), "g_patch": r(1, 2 * B, S, K), "g_mask": mask}
    t = {"g_cls": r(2 * B, 1, K), "g_patch": r(1, 2 * B, S, K), "g_mask": mask}
    return s, t


def test_udi_loss_softmax_and_centres_are_fp32_under_autocast():
    from visionzoo.ssl.udi.loss import UDILoss

    ref_loss, low_loss = UDILoss(64, 0), UDILoss(64, 0)
    ref, _ = ref_loss(*_udi_outputs(), epoch=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Calls("softmax", "log_softmax") as rec:
        low, parts = low_loss(*_udi_outputs(dtype=torch.bfloat16), epoch=0)
    assert rec.calls and all(d == (torch.float32,) and not on for _, d, on in rec.calls)
    assert low.dtype == torch.float32 and low_loss.center.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in low_loss.last_targets.values())
    assert abs(float(low) - float(ref)) / abs(float(ref)) < 1e-2  # only the inputs' bf16 rounding differs
    torch.testing.assert_close(low_loss.center, ref_loss.center, atol=5e-3, rtol=0)


@pytest.mark.parametrize("name", ["coc_test", "gpvit_test", "ga_test", "gcr_test", "udi_vit_test"])
def test_bf16_outputs_stay_close_to_fp32(name):
    torch.manual_seed(0)
    model = visionzoo.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with prec.autocast_context("cpu", "bf16"):
            low = model(x)
    ref, low = (torch.stack(list(o)).sum(0) if isinstance(o, (tuple, list)) else o for o in (ref, low))
    assert _relative_error(low, ref) < 5e-2


# ----------------------------------------------------------------------------------------------------------------
# learning check: the demo recipe learns the same in bf16 as in fp32


@pytest.mark.slow
def test_demo_recipe_reaches_the_same_accuracy_in_bf16_as_in_fp32(tmp_path):
    from visionzoo.tasks.classify import train

    top1 = {}
    for amp in ("fp32", "bf16"):
        cfg = load_config("demo/digits", {"amp": amp, "output": str(tmp_path), "experiment": amp})
        top1[amp] = train(cfg, device="cpu")["val_top1"]
    assert top1["fp32"] > 90 and top1["bf16"] > 90, top1
    assert abs(top1["bf16"] - top1["fp32"]) < 2.5, top1  # the seed spread of the demo is about 1 point


# ----------------------------------------------------------------------------------------------------------------
# GPU: one AMP step of every task (bf16; fp16 with the grad scaler), through the engine's --profile path


def _task(kind: str, amp: str):
    from dataclasses import replace

    if kind == "classify":
        from visionzoo.tasks.classify import ClassifyTask

        return ClassifyTask(load_config("demo/digits", {"batch_size": 16, "amp": amp, "workers": 0}))
    if kind == "udi":
        from visionzoo.ssl.udi.config import UDIConfig
        from visionzoo.tasks.udi import UDITask

        cfg = UDIConfig.from_yaml("udi/pretrain_vit_test_cpu", amp=amp, batch_size=16, workers=0,
                                  max_train_images=64, online_knn=False)
        return UDITask(cfg)
    if kind == "detect":
        from visionzoo.dense.detection.config import DetectionConfig
        from visionzoo.tasks.detect import DetectTask

        return DetectTask(replace(DetectionConfig.from_yaml("detection/maskrcnn_shapes_cpu"), amp=amp, workers=0))
    if kind == "segment":
        from visionzoo.dense.segmentation.config import SegmentationConfig
        from visionzoo.tasks.segment import SegmentTask

        return SegmentTask(replace(SegmentationConfig.from_yaml("segmentation/segformer_shapes_cpu"), amp=amp,
                                   workers=0))
    if kind == "pointcloud":
        from visionzoo.dense.pointcloud.config import PointCloudConfig
        from visionzoo.tasks.pointcloud import PointCloudTask

        return PointCloudTask(replace(PointCloudConfig.from_yaml("pointcloud/coc_pointmlp_shapes_cpu"), amp=amp,
                                      workers=0))
    from visionzoo.tasks.linear_probe import LinearProbeConfig, LinearProbeTask

    return LinearProbeTask(LinearProbeConfig(model="udi_vit_test", data="digits", augment="none", batch_size=64,
                                             workers=0, amp=amp))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["classify", "udi", "detect", "segment", "pointcloud", "linear"])
def test_one_amp_step_of_every_task_on_gpu(kind, amp):
    from visionzoo.engine.profile import profile

    result = profile(_task(kind, amp), steps=1, device="cuda")
    assert result["step_img_s"] > 0
    assert result["precision"] == ("bf16 autocast" if amp == "bf16" else "fp16 autocast + grad scaler")


@pytest.mark.gpu
def test_fp16_step_on_gpu_uses_the_scaler_and_stays_finite():
    p = prec.Precision(torch.device("cuda"), "fp16")
    assert p.scaler is not None
    model = torch.nn.Linear(8, 2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with p.autocast():
        loss = model(torch.randn(4, 8, device="cuda")).float().pow(2).mean()
    p.backward(loss)
    p.step(opt, model.parameters(), clip=1.0)
    assert all(torch.isfinite(q).all() for q in model.parameters())


def test_cpu_attention_is_fp32_under_bf16():
    # on CPUs the bf16 attention kernel is slower than the fp32 one (docs/benchmarks.md): every model's attention
    # (models/_attention.sdpa) computes in fp32 and hands back bf16, so the only error left is the output's rounding
    import torch.nn.functional as F

    from visionzoo.models._attention import sdpa

    q, k, v = (torch.randn(2, 3, 7, 18, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v).to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32
    assert sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16  # a bf16 model: same rule
    assert torch.equal(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))  # fp32: untouched


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classification_loss_is_fp32_under_bf16(smoothing):
    # CPU autocast leaves log_softmax in bf16 (CUDA's policy runs it in fp32): the classify task hands the loss
    # fp32 logits, so a bf16 run computes its loss and logit gradient as a GPU AMP run does
    from visionzoo.engine.task import Context
    from visionzoo.tasks.classify import ClassifyTask

    task = ClassifyTask(TrainConfig(model="coc_test", dataset="digits", smoothing=smoothing))
    ctx = Context(cfg=task.cfg, device=torch.device("cpu"), rank=0, world_size=1, run_dir=None)
    task.prepare(ctx)
    net = task.build_model(ctx)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16), _Calls("log_softmax", "cross_entropy") as rec:
        loss = task.train_step(net, batch, None)["loss"]
    assert loss.dtype == torch.float32
    assert rec.calls and all(d[0] == torch.float32 for _, d, _ in rec.calls)


@pytest.mark.parametrize("name,kwargs", [
    ("udi_vit_test", {}), ("gpvit_test", {}), ("ga_vit_small", dict(img_size=32, num_classes=10)),
    ("deit3_small_patch16_224_gcr8", dict(img_size=32, num_classes=10, depth=2))])
def test_every_attention_of_a_model_runs_fp32_on_cpu_under_bf16(name, kwargs):
    # the rule of models/_attention.py holds inside timm's blocks too (UDI backbone and GA's ViT trunk take our
    # Attention as their attn_layer; GCR's timm ViT backbone gets it by models._attention.follow_cpu_rule):
    # no attention product of a forward+backward runs in bf16 on a CPU
    model = visionzoo.create_model(name, **kwargs)
    size = kwargs.get("img_size", 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Calls("scaled_dot_product_attention") as rec:
        out = model(torch.randn(2, 3, size, size))
        out.float().sum().backward()
    assert rec.calls and all(not on and set(d) == {torch.float32} for _, d, on in rec.calls)


def test_timm_attention_under_the_cpu_rule_computes_what_timms_does():
    # follow_cpu_rule swaps the class only: in fp32 the ViT gives timm's outputs and gradients, from the same keys
    from visionzoo.models._attention import Attention, follow_cpu_rule

    torch.manual_seed(0)
    theirs = timm.create_model("deit3_small_patch16_224", img_size=32, num_classes=3, depth=2)
    ours = follow_cpu_rule(copy.deepcopy(theirs))
    assert sum(type(m) is Attention for m in ours.modules()) == 2
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_t, out_o = theirs(x), ours(x)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-5)
    out_t.square().sum().backward()
    out_o.square().sum().backward()
    for (n, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
