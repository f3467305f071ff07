"""Frozen features of any model, and the weighted k-NN classifier (the evaluation suite's shared core).

``visionzoo knn``, ``visionzoo linear``, ``visionzoo transfer`` and the online k-NN of ``visionzoo pretrain`` all
read features through :func:`extract`, so every model of the library (and timm's) is evaluated the same way.

Which feature (``token``):

* ``cls``: the [CLS] token (index 0) after the final norm, as DINO and UDI evaluate ViTs;
* ``cls+``: UDI's second class token [CLS+] (index 1; timm's ``reg_token`` of ``reg_tokens=1`` ViTs);
* ``both``: [CLS] and [CLS+] concatenated;
* ``pooled``: ``forward_head(forward_features(x), pre_logits=True)``, the model's own pooled feature (CNNs, or ViTs
  with average pooling);
* ``auto``: ``cls`` for a ViT that classifies from its class token, else ``pooled``.

``n_last_blocks`` > 1 concatenates the token of the last n blocks, each through the final norm (DINO's linear
protocol, ``n_last_blocks 4`` for ViT-S); ``avgpool_patchtokens`` appends the mean of the last block's patch tokens.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..engine.precision import autocast_context
from ..errors import UserError

TOKENS = ("auto", "cls", "cls+", "both", "pooled")


def _class_tokens(model) -> int:
    """How many class-like prefix tokens the model has with a class token first (0 for CNNs)."""
    if getattr(model, "cls_token", None) is None:
        return 0
    return int(getattr(model, "num_prefix_tokens", 1))


def resolve_token(model, token: str = "auto") -> str:
    """The concrete token choice for ``model``; a clear error when the model cannot give it."""
    if token not in TOKENS:
        raise UserError(f"unknown token {token!r}; choose one of {', '.join(TOKENS)}")
    n_cls = _class_tokens(model)
    if token == "auto":
        return "cls" if n_cls and getattr(model, "global_pool", "token") == "token" else "pooled"
    if token in ("cls", "cls+", "both"):
        need = 1 if token == "cls" else 2
        if n_cls < need:
            name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
            what = "a class token" if need == 1 else "a second class token [CLS+] (udi_vit_* or reg_tokens=1)"
            raise UserError(f"token {token!r} needs {what}; model '{name}' has {n_cls} prefix token(s). "
                            f"Use --token pooled (or auto).")
    return token


def _token_features(tokens: torch.Tensor, token: str) -> torch.Tensor:
    return {"cls": tokens[:, 0], "cls+": tokens[:, 1], "both": tokens[:, :2].flatten(1)}[token]


def model_features(model, x: torch.Tensor, token: str = "auto", n_last_blocks: int = 1,
                   avgpool_patchtokens: bool = False) -> torch.Tensor:
    """Features (B, D) of a batch ``x`` for a model in eval mode (see the module docstring)."""
    token = resolve_token(model, token)
    if token == "pooled":
        if n_last_blocks != 1 or avgpool_patchtokens:
            raise UserError("n_last_blocks / avgpool_patchtokens apply to class tokens; use --token cls with a ViT")
        if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
            return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
        return model(x).flatten(1)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    if n_last_blocks == 1:
        blocks = [model.forward_features(x)]  # final-normed tokens (B, prefix + N, C)
    else:
        outs = model.forward_intermediates(x, indices=n_last_blocks, norm=True, output_fmt="NLC",
                                           intermediates_only=True, return_prefix_tokens=True)
        blocks = [torch.cat([prefix, patches], dim=1) for patches, prefix in outs]
    feats = [_token_features(t, token) for t in blocks]
    if avgpool_patchtokens:
        feats.append(blocks[-1][:, n_prefix:].mean(1))
    return torch.cat(feats, dim=-1)


@torch.no_grad()
def extract(model, loader: Iterable, device: torch.device | str = "cpu", token: str = "auto", n_last_blocks: int = 1,
            avgpool_patchtokens: bool = False, autocast=None, to_cpu: bool = True,
            amp="fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), labels int64 (N,)) of every batch of ``loader``, the model in eval mode, in the
    precision ``amp`` (auto, bf16, fp16, fp32), or under ``autocast`` (a context manager: a training run's own)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with autocast if autocast is not None else autocast_context(device, amp):
                f = model_features(model, x.to(device, non_blocking=True), token, n_last_blocks,
                                   avgpool_patchtokens)
            f = f.float()
            y = torch.as_tensor(y)
            feats.append(f.cpu() if to_cpu else f)
            labels.append(y if to_cpu else y.to(device))
    finally:
        model.train(was_training)
    if not feats:
        raise UserError("the data set is empty: no features to extract")
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (10, 20, 100, 200), T: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict[int, dict[str, float]]:
    """Weighted k-NN (DINO): cosine similarity to every train feature, class score = sum over the k nearest of
    exp(sim / T). Returns ``{k: {"top1": %, "top5": %}}``; k larger than the train set is clipped to it.

    One top-k of the largest k per test chunk serves every k (the neighbours of a smaller k are its prefix).
    """
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1).to(train_feats.device)
    train_labels = train_labels.to(train_feats.device).long()
    test_labels = test_labels.to(train_feats.device).long()
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    ks = sorted({min(int(k), train_feats.shape[0]) for k in ks})
    if not ks or ks[0] < 1:
        raise UserError(f"k must be >= 1, got {ks}")
    n_top = min(5, num_classes)
    top1 = {k: torch.zeros((), dtype=torch.long, device=train_feats.device) for k in ks}
    top5 = {k: torch.zeros((), dtype=torch.long, device=train_feats.device) for k in ks}
    for i in range(0, test_feats.shape[0], chunk):
        target = test_labels[i:i + chunk, None]
        sim, idx = (test_feats[i:i + chunk] @ train_feats.T).topk(ks[-1], dim=1)
        weight, neighbour_labels = (sim / T).exp(), train_labels[idx]
        for k in ks:  # a handful of k values, not a loop over samples
            scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
            pred = scores.topk(n_top, dim=1).indices
            top1[k] += (pred[:, :1] == target).sum()
            top5[k] += (pred == target).any(1).sum()
    n = max(test_feats.shape[0], 1)
    return {k: {"top1": 100.0 * float(top1[k]) / n, "top5": 100.0 * float(top5[k]) / n} for k in ks}
