"""`visionzoo export`: a model (classifier or ``features_only``) to a ``torch.export`` program (.pt2) or ONNX.

Both formats go through torch's own exporters (``torch.export.export``; ONNX by the dynamo exporter, which exports
that same program), so a model exports to ONNX exactly when it exports at all. After writing, the file is loaded back
and run on a fresh input (ONNX through onnxruntime when it is installed), and the largest difference from the eager
model is printed: a silent wrong export is worse than a failed one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .errors import MissingDependencyError, UserError
from .files import atomic_write

_logger = logging.getLogger("visionzoo")

FORMATS = {"exported-program": ".pt2", "onnx": ".onnx"}
# fp32 exports reproduce eager to rounding: the verification fails beyond this (relative to the output's scale)
VERIFY_RTOL = 1e-4


class ExportError(UserError):
    """A model that torch's exporter cannot capture, or an export that does not reproduce the eager model."""


def _outputs(out) -> list[torch.Tensor]:
    """A model's outputs as a flat list (a classifier's logits; ``features_only``'s maps; GA's tuple of heads)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _outputs(o)]


def checkpoint_num_classes(model: nn.Module, checkpoint: str) -> int | None:
    """The class count of ``checkpoint``'s classifier as the family converter maps it onto ``model``, or None when
    it has none or it matches (an export with a newly initialised head would be silently useless)."""
    from .models import read_state_dict
    from .models._registry import family_filter_fn

    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    sd = read_state_dict(checkpoint)
    filter_fn = family_filter_fn(model)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    for name in names:
        w = sd.get(f"{name}.weight")
        if w is not None and f"{name}.weight" in own and w.shape[0] != own[f"{name}.weight"].shape[0]:
            return int(w.shape[0])
    return None


def build_model(model_name: str, checkpoint: str | None = None, features_only: bool = False,
                num_classes: int | None = None, use_ema: bool = False) -> nn.Module:
    """The model to export: a name (+ weights through the project's checkpoint resolver), a save_pretrained folder
    or a run folder. The classifier takes the checkpoint's class count unless ``num_classes`` says otherwise."""
    from .evals.evaluate import load_model_or_run

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if features_only:
        kwargs["features_only"] = True
    if checkpoint is not None and num_classes is None and not features_only and not Path(model_name).is_dir():
        from .models import create_model

        probe = create_model(model_name)
        found = checkpoint_num_classes(probe, checkpoint)
        if found is not None:
            _logger.info("%s has a %d-class classifier: exporting it with num_classes=%d", checkpoint, found, found)
            kwargs["num_classes"] = found
    model, _ = load_model_or_run(model_name, checkpoint=checkpoint, use_ema=use_ema, **kwargs)
    return model.eval()


def example_input(model: nn.Module, img_size: int | None, batch_size: int) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return torch.randn(batch_size, chans, h, w)


def capture(model: nn.Module, x: torch.Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` at ``x``'s shape; with ``dynamic_batch`` the batch size stays symbolic."""
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        return torch.export.export(model, (x,), dynamic_shapes=dynamic)
    except Exception as e:  # the exporter's own message says which op or line it could not capture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (" It may specialise on the batch size: try without --dynamic-batch." if dynamic_batch else "")
        raise ExportError(f"torch.export could not capture {type(model).__name__} at input {tuple(x.shape)}: "
                          f"{first}.{hint} (VISIONZOO_DEBUG=1 shows the whole trace)") from e


def write(program: torch.export.ExportedProgram, fmt: str, path: Path, opset: int | None = None) -> Path:
    if fmt == "exported-program":
        return atomic_write(path, lambda tmp: torch.export.save(program, tmp))
    try:
        import onnx  # noqa: F401  (the dynamo exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxscript ({e.name} is missing): "
                                     f"pip install 'visionzoo[export]'") from None

    def save(tmp: str) -> None:
        # the dynamo exporter and its optimiser report each step: keep the command's output to our own lines
        # (a failure still raises with its message)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
            onnx_program.save(tmp, external_data=False)

    return atomic_write(path, save)


def run_exported(fmt: str, path: Path, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The exported file's outputs for ``x``; None when ONNX runs and onnxruntime is not installed."""
    if fmt == "exported-program":
        return _outputs(torch.export.load(str(path)).module()(x))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def max_relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max |got - ref| / max |ref| over every output (shapes must agree)."""
    if len(got) != len(ref):
        raise ExportError(f"the exported model returns {len(got)} outputs, the eager model {len(ref)}")
    worst = 0.0
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            raise ExportError(f"an exported output has shape {tuple(g.shape)}, the eager one {tuple(r.shape)}")
        worst = max(worst, float((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)))
    return worst


def export(model_name: str, checkpoint: str | None = None, fmt: str = "onnx", output: str | None = None,
           img_size: int | None = None, batch_size: int = 2, dynamic_batch: bool = False,
           features_only: bool = False, num_classes: int | None = None, use_ema: bool = False,
           opset: int | None = None, verify: bool = True) -> dict:
    """Export and verify; returns what it printed (path, format, input shape, verification error)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    model = build_model(model_name, checkpoint, features_only, num_classes, use_ema)
    if dynamic_batch:  # torch.export specialises sizes 0 and 1: a symbolic batch is traced at 2 or more
        batch_size = max(batch_size, 2)
    x = example_input(model, img_size, batch_size)
    stem = Path(model_name).name if Path(model_name).is_dir() else model_name
    path = Path(output) if output else Path(f"{stem}{'-features' if features_only else ''}{FORMATS[fmt]}")
    if path.is_dir():
        raise UserError(f"--output {path} is a folder: name the file to write, e.g. {path / (stem + FORMATS[fmt])}")
    if fmt == "exported-program" and path.suffix != ".pt2":  # torch.export.load reads only .pt2 names
        raise UserError(f"--output {path}: an exported program is a .pt2 file; use {path.with_suffix('.pt2')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        program = capture(model, x, dynamic_batch)
    write(program, fmt, path, opset)
    result = {"path": str(path), "format": fmt, "input_shape": list(x.shape), "dynamic_batch": dynamic_batch,
              "seconds": round(time.perf_counter() - start, 1), "size_mb": round(path.stat().st_size / 2**20, 2)}
    if verify:
        # a fresh input, and another batch size when the batch is dynamic, so a specialised export is caught
        check = example_input(model, img_size, batch_size + 1 if dynamic_batch else batch_size)
        with torch.no_grad():
            ref = _outputs(model(check))
            got = run_exported(fmt, path, check)
        if got is None:
            result["verified"] = "skipped (pip install onnxruntime to run the ONNX file)"
        else:
            err = max_relative_error(got, ref)
            result["max_rel_error"] = float(f"{err:.3g}")
            if err > VERIFY_RTOL:
                raise ExportError(f"{path} does not reproduce the eager model: max relative error {err:.3g} > "
                                  f"{VERIFY_RTOL:g} (the file is kept; --no-verify skips this check)")
            result["verified"] = f"{'onnxruntime' if fmt == 'onnx' else 'torch.export.load'}, input " \
                                 f"{list(check.shape)}"
    print(f"exported {model_name} -> {path} ({fmt}, input {list(x.shape)}"
          f"{', dynamic batch' if dynamic_batch else ''}, {result['size_mb']} MB, {result['seconds']} s)")
    if verify:
        print(f"verified: {result['verified']}" + (f", max relative error {result['max_rel_error']:.3g}"
                                                   if "max_rel_error" in result else ""))
    return result


def run(args) -> int:
    export(args.model, checkpoint=args.checkpoint, fmt=args.format, output=args.output, img_size=args.img_size,
           batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, features_only=args.features_only,
           num_classes=args.num_classes, use_ema=args.use_ema, opset=args.opset, verify=not args.no_verify)
    return 0
