"""Run outputs: a metrics CSV (always), TensorBoard (when installed) and a loss/accuracy curve PNG."""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from pathlib import Path

from ..files import atomic_write_text

_logger = logging.getLogger("visionzoo")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced, e.g. by a test's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(is_main: bool = True) -> logging.Logger:
    if not _logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        _logger.addHandler(handler)
        _logger.propagate = False
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    return _logger


class MetricsWriter:
    """Append one row per epoch to ``metrics.csv``; mirror scalars to TensorBoard if it is installed."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard not installed: the CSV is enough
                self.tb = None

    def write(self, row: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        rows = read_metrics(self.path) if self.path.exists() else []
        key = "step" if "step" in row else "epoch"  # a row redone after a resume replaces the first one
        rows = [r for r in rows if str(r.get(key)) != str(row[key])] + [{k: _fmt(v) for k, v in row.items()}]
        self._write_rows(rows)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, step if step is not None else row.get("epoch", 0))
            self.tb.flush()

    def truncate(self, step: int) -> None:
        """Drop the rows after ``step`` (written after the training state a run resumes from)."""
        if self.enabled and self.path.exists():
            self._write_rows([r for r in read_metrics(self.path) if int(float(r.get("step") or 0)) <= step])

    def _write_rows(self, rows: list[dict]) -> None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path | None:
    """Loss curves (train/val) and accuracy curves (val top-1/top-5 or k-NN) against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    if not rows:
        return None

    x = "epoch" if len({r.get("epoch") for r in rows}) == len(rows) else "step"

    def series(name):
        pts = [(float(r[x]), float(r[name])) for r in rows if r.get(name) not in (None, "", "nan")]
        return [p for p in pts if math.isfinite(p[1])]

    loss_keys = [k for k in rows[0] if k.endswith("loss")]
    acc_keys = [k for k in rows[-1] if any(s in k.lower() for s in ("top1", "top5", "knn", "acc", "iou", "map", "oa"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, ylabel in ((axes[0], loss_keys, "loss"), (axes[1], acc_keys, "metric")):
        for k in keys:
            pts = series(k)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)
