"""The online k-NN monitor (weighted k-NN as DINO: cosine similarity, weights exp(sim / T))."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# ================================================================================================================
# k-NN monitor (weighted k-NN as DINO: cosine similarity, weights exp(sim / T))

def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy (in %) of the weighted k-NN classifier (``evals.features.knn_classify`` for one k)."""
    from ...evals.features import knn_classify

    return knn_classify(train_feats, train_labels, test_feats, test_labels, (k,), T, num_classes, chunk)[
        min(k, train_feats.shape[0])]["top1"]


def extract_features(backbone: nn.Module, loader, device: torch.device, token: str = "cls",
                     autocast: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] (``token='cls'``), [CLS+] (``'cls+'``) or both concatenated (``'both'``) after the final norm, on
    ``device`` (``evals.features.extract``)."""
    from ...evals.features import extract

    return extract(backbone, loader, device, token=token, autocast=autocast, to_cpu=False)
