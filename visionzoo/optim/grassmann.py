"""Riemannian optimizer for GCR: Euclidean SGD / AdamW / LAMB + Riemannian SGD on Grassmann class subspaces.

One composite optimizer (``GrassmannOptimizer``). Its ``param_groups`` hold every group: the Euclidean groups are
the very dicts of an inner torch/timm optimizer (so LR schedulers, GradScaler and ``zero_grad`` see them), and the
geometry groups are marked ``grassmann=True`` with the subspace dimension in ``subspace_dim`` (a group key, not a
tensor attribute, so it survives ``deepcopy`` and ``load_state_dict(assign=True)``).

The geometry update is the official RSGD (spec gcr.md section 2.1), for each subspace weight W (K*k rows):

1. b <- mu*b + grad (raw Euclidean momentum, b = grad on the first step; no weight decay, dampening as given);
2. per class P = block^T (n x k): G = B - P P^T B (projection onto the tangent space at P);
3. thin SVD G = U diag(s) V^T; t = -lr*lr_factor; P <- (P V cos(t s) + U sin(t s)) V^T (Grassmann geodesic);
4. if counter % reorth_step == 0: P <- Q of QR(P) (torch.linalg.qr, no sign fix); counter += 1 per subspace tensor.

``lr`` of a geometry group is re-synced at every step from the first Euclidean group's lr (what the scheduler set),
as the official wrappers do, so warmup/decay apply to the subspaces too. Then the Euclidean optimizer steps.
Differences from the official code, all deliberate: the counter and the geometry momentum are in ``state_dict``
(exact resume), the SVD runs on CPU for every k (the official one needs CUDA for k > 2), and nothing is
process-global.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import UserError

__all__ = ["GrassmannOptimizer", "create_grassmann_optimizer", "grassmann_param_groups", "clip_parameters"]

_BASES = ("sgd", "adamw", "lamb")


def _base_class(base: str | type) -> type:
    if isinstance(base, type):
        return base
    name = base.lower()
    for prefix in ("gcr_", "r"):
        if name.startswith(prefix) and name[len(prefix):] in _BASES:
            name = name[len(prefix):]
    if name == "sgd":
        return torch.optim.SGD
    if name == "adamw":
        return torch.optim.AdamW
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb
    raise UserError(f"Unknown Euclidean optimizer '{base}' for GCR. Valid: {', '.join(_BASES)} "
                    "(optionally prefixed gcr_, e.g. opt: gcr_lamb).")


class GrassmannOptimizer(Optimizer):
    """Composite optimizer: ``base`` (SGD / AdamW / LAMB) on Euclidean groups, Riemannian SGD on geometry groups.

    Args:
        params: a list of param-group dicts; geometry groups have ``grassmann=True`` and ``subspace_dim=k``
            (see :func:`grassmann_param_groups`).
        base: 'sgd' | 'adamw' | 'lamb' or an Optimizer class, for the Euclidean groups.
        lr: base learning rate (Euclidean default; the geometry lr is synced from the first Euclidean group).
        lr_factor: geometry lr multiplier (per group key ``lr_factor`` overrides it).
        momentum: geometry momentum (per group key ``momentum``), also SGD's momentum when ``base='sgd'``.
        reorth_step: QR re-orthonormalisation every this many subspace updates (official: 5 for RSGD, 1 for
            the AdamW/LAMB wrappers); the first update always re-orthonormalises.
        clip_grad: optional max norm (or value, ``clip_mode``) applied in ``step()`` to the Euclidean gradients
            only. Leave None when the training loop clips (then it must use :func:`clip_parameters`).
        **base_kwargs: passed to the Euclidean optimizer (weight_decay, betas, eps, max_grad_norm, ...).
    """

    def __init__(self, params: Iterable[dict], base: str | type = "sgd", lr: float = 0.1, lr_factor: float = 1.0,
                 momentum: float = 0.9, reorth_step: int = 5, clip_grad: float | None = None,
                 clip_mode: str = "norm", **base_kwargs: Any):
        groups = list(params)
        if not groups or not all(isinstance(g, dict) for g in groups):
            raise UserError("GrassmannOptimizer needs a list of param-group dicts (geometry groups marked "
                            "grassmann=True); build them with grassmann_param_groups(model, ...).")
        if int(reorth_step) < 1:
            raise UserError(f"reorth_step must be >= 1, got {reorth_step}.")
        self.base_cls = _base_class(base)
        self.reorth_step, self.clip_grad, self.clip_mode = int(reorth_step), clip_grad, clip_mode
        self._counter = 0  # subspace updates done (drives the periodic QR); saved in state_dict
        self._geo_defaults = dict(lr=lr, lr_factor=float(lr_factor), momentum=float(momentum), dampening=0.0,
                                  weight_decay=0.0, maximize=False)
        euclid = [g for g in groups if not g.get("grassmann")]
        geo = [self._geo_group(g) for g in groups if g.get("grassmann")]
        if not geo:
            raise UserError("GrassmannOptimizer got no geometry group (grassmann=True): the model has no "
                            "GrassmannHead. Use a *_gcr* model or visionzoo.models.grassmann.to_grassmann().")
        if self.base_cls is torch.optim.SGD:
            base_kwargs.setdefault("momentum", momentum)
        self.base = self.base_cls(euclid, lr=lr, **base_kwargs) if euclid else None
        self._ready = False
        super().__init__((self.base.param_groups if self.base else []) + geo, dict(lr=lr))
        self._ready = True
        self._bind()

    def _geo_group(self, group: dict) -> dict:
        if "subspace_dim" not in group or int(group["subspace_dim"]) < 1:
            raise UserError("A geometry param group (grassmann=True) needs 'subspace_dim' (k of the GrassmannHead).")
        for k, v in self._geo_defaults.items():
            group.setdefault(k, v)
        group["weight_decay"] = 0.0  # never on subspaces (and it would be normal to the manifold anyway)
        group["no_clip"] = True  # a clipped Riemannian gradient is no longer the official step
        return group

    def _bind(self) -> None:
        """Share groups and state with the inner optimizer (also after ``load_state_dict`` replaced them)."""
        if self.base is not None:
            self.base.param_groups = [g for g in self.param_groups if not g.get("grassmann")]
            self.base.state = self.state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):  # after __init__: route the group to its part
            if param_group.get("grassmann"):
                param_group = self._geo_group(param_group)
            elif self.base is None:
                raise UserError("GrassmannOptimizer built without Euclidean groups cannot add one; rebuild it.")
            else:
                self.base.add_param_group(param_group)
                self.base.param_groups.pop()  # re-added by _bind below in the composite order
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            self._bind()

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["grassmann"] = {"counter": self._counter, "reorth_step": self.reorth_step}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("grassmann", None) or {}
        super().load_state_dict(state_dict)
        self._counter = int(extra.get("counter", 0))
        self._bind()

    # --- stepping ---------------------------------------------------------------------------------------------
    def euclidean_parameters(self) -> list[nn.Parameter]:
        return clip_parameters(self)

    def clip_grad_(self, max_norm: float, mode: str = "norm") -> torch.Tensor | None:
        """Clip the Euclidean gradients only (subspace gradients never enter the norm). Returns the norm (norm mode)."""
        from timm.utils import dispatch_clip_grad

        params = [p for p in self.euclidean_parameters() if p.grad is not None]
        if not params:
            return None
        if mode == "norm":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        dispatch_clip_grad(params, max_norm, mode=mode)
        return None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.clip_grad is not None:
            self.clip_grad_(self.clip_grad, self.clip_mode)
        lr0 = self.base.param_groups[0]["lr"] if self.base is not None and self.base.param_groups else None
        # official order: the Riemannian step first, then the Euclidean optimizer
        for group in self.param_groups:
            if not group.get("grassmann"):
                continue
            if lr0 is not None:
                group["lr"] = lr0
            for p in group["params"]:
                if p.grad is not None:
                    # fp32 even when stepped inside an autocast region: autocast would run the projections and
                    # the geodesic's matmuls in bf16/fp16, and the bases would drift off the manifold
                    with torch.autocast(p.device.type, enabled=False):
                        self._subspace_step(p, group)
        if self.base is not None:
            self.base.step()
        return loss

    def _subspace_step(self, p: torch.Tensor, group: dict) -> None:
        k = int(group["subspace_dim"])
        if p.ndim != 2 or p.shape[0] % k:
            raise UserError(f"Geometry parameter of shape {tuple(p.shape)} is not (num_classes*{k}, in_features).")
        d = p.grad
        mu = group["momentum"]
        if mu != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(mu).add_(d, alpha=1 - group["dampening"])
            d = buf
        num_classes, n = p.shape[0] // k, p.shape[1]
        # (K, n, k) column bases; computed in float32 at least (bf16 SVD/QR is not accurate enough)
        work = torch.promote_types(p.dtype, torch.float32)
        P = p.detach().view(num_classes, k, n).transpose(1, 2).to(work)
        D = d.view(num_classes, k, n).transpose(1, 2).to(work)
        G = D - P @ (P.transpose(1, 2) @ D)
        # cuSOLVER's gesvda (as official) only on CUDA; CPU uses LAPACK gesdd for every k
        driver = "gesvda" if (P.is_cuda and k > 2) else None
        U, s, Vh = torch.linalg.svd(G, full_matrices=False, driver=driver)
        t = group["lr"] * group["lr_factor"] * (1.0 if group["maximize"] else -1.0)
        ts = t * s
        new = (P @ Vh.transpose(1, 2) * torch.cos(ts).unsqueeze(1) + U * torch.sin(ts).unsqueeze(1)) @ Vh
        if self._counter % self.reorth_step == 0:
            new = torch.linalg.qr(new).Q  # no sign fix: the official trajectory depends on it
        self._counter += 1
        p.copy_(new.transpose(1, 2).reshape(p.shape).to(p.dtype))


def clip_parameters(optimizer: Optimizer) -> list[nn.Parameter]:
    """The parameters whose gradients may be clipped: all but those in ``grassmann`` groups."""
    return [p for g in optimizer.param_groups if not g.get("grassmann") for p in g["params"]]


def grassmann_param_groups(model: nn.Module, weight_decay: float = 0.0, filter_bias_and_bn: bool = True,
                           no_weight_decay: Iterable[str] | None = None, lr_factor: float | None = None) -> list[dict]:
    """Param groups for :class:`GrassmannOptimizer`: Euclidean decay / no-decay groups first, then one geometry group
    per GrassmannHead (``grassmann=True, subspace_dim=k``). Frozen parameters are left out.

    With ``filter_bias_and_bn`` (timm's default) 1-d params, biases and the model's ``no_weight_decay()`` names get
    no weight decay; the official ResNet/VGG RSGD configs decay everything (``filter_bias_and_bn=False``).
    """
    from ..models.grassmann import grassmann_heads

    heads = grassmann_heads(model)
    geo_ids = {id(h.weight) for _, h in heads}
    skip = set(no_weight_decay or ())
    if no_weight_decay is None and hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in geo_ids:
            continue
        if filter_bias_and_bn and (p.ndim <= 1 or name.endswith(".bias") or name in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    for _, h in heads:
        if h.weight.requires_grad:
            g = {"params": [h.weight], "grassmann": True, "subspace_dim": h.dim, "weight_decay": 0.0}
            if lr_factor is not None:
                g["lr_factor"] = lr_factor
            groups.append(g)
    return groups


def create_grassmann_optimizer(model: nn.Module, opt: str = "sgd", lr: float = 0.1, weight_decay: float = 1e-4,
                               lr_factor: float = 1.0, momentum: float = 0.9, clip_grad: float | None = None,
                               clip_mode: str = "norm", reorth_step: int | None = None,
                               filter_bias_and_bn: bool = True, **opt_kwargs: Any) -> GrassmannOptimizer:
    """The GCR optimizer for ``model`` (any module holding GrassmannHeads).

    ``opt``: 'sgd' (official RSGD: SGD with ``momentum`` on Euclidean params), 'adamw' (RAdamWOptimizer) or
    'lamb' (RLambOptimizer); a ``gcr_`` prefix is accepted. The subspaces get Riemannian SGD with momentum
    ``momentum`` (0.9 in every official config), no weight decay, lr = (first Euclidean group's lr) * lr_factor,
    and a QR every ``reorth_step`` updates (default: 5 for sgd, 1 for adamw/lamb, as official).
    ``opt_kwargs`` go to the Euclidean optimizer (eps, betas, nesterov, max_grad_norm, ...; None values dropped).
    ``clip_grad``: clip the Euclidean gradients inside ``step()``; leave None when the training loop clips
    with :func:`clip_parameters`.
    """
    base = _base_class(opt)
    if reorth_step is None:
        reorth_step = 5 if base is torch.optim.SGD else 1
    opt_kwargs = {k: v for k, v in opt_kwargs.items() if v is not None}
    if "betas" in opt_kwargs:
        opt_kwargs["betas"] = tuple(opt_kwargs["betas"])
    groups = grassmann_param_groups(model, weight_decay, filter_bias_and_bn)
    return GrassmannOptimizer(groups, base=base, lr=lr, lr_factor=lr_factor, momentum=momentum,
                              reorth_step=reorth_step, clip_grad=clip_grad, clip_mode=clip_mode,
                              weight_decay=weight_decay, **opt_kwargs)
