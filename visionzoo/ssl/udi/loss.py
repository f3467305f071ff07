"""The three-level UDI objective with three centers (spec section 4)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...engine.precision import fp32_island

# ================================================================================================================
# objective (section 4)

def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.ones(max(epochs - warmup_epochs, 0)) * temp))


class UDILoss(nn.Module):
    """The three-level UDI objective with three centers (cls, cls+ target, patch), section 4.

    ``forward(student, teacher, epoch)`` takes the dicts of ``UDINetwork`` and returns ``(loss, parts)`` with
    parts g_cls, g_clsp, g_patch, l_cls, l_clsp, teacher_temp (detached). Centers are updated in ``forward``.
    """

    def __init__(self, out_dim: int, num_local_crops: int, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 30, epochs: int = 300,
                 alpha: float = 0.5, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.num_local_crops = num_local_crops
        self.alpha, self.student_temp, self.center_momentum = alpha, student_temp, center_momentum
        self.temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)
        self.final_temp = teacher_temp
        self.register_buffer("center", torch.zeros(3, out_dim))
        self.last_targets: dict[str, torch.Tensor] = {}

    def teacher_temp(self, epoch: int) -> float:
        epoch = int(epoch)
        return float(self.temps[epoch]) if epoch < len(self.temps) else float(self.final_temp)

    @staticmethod
    def _masked_mean(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
        return (x * m).sum(dim) / (m.sum(dim) + 1e-5)

    def forward(self, s: dict, t: dict, epoch: int | None = None, teacher_temp: torch.Tensor | None = None):
        """The loss at ``epoch``'s teacher temperature, or at ``teacher_temp`` (a 0-d tensor, e.g. from
        :meth:`teacher_temp_tensor`: a compiled step then sees a tensor, not a new constant each epoch)."""
        # the softmaxes, cross-entropies and centres in fp32 under any autocast: with out_dim 65536 and a
        # teacher temperature of 0.04, bf16 logits would lose the targets' fine structure
        with fp32_island(t["g_cls"]):
            return self._forward(s, t, self.teacher_temp(epoch) if teacher_temp is None else teacher_temp)

    def teacher_temp_tensor(self, epoch: int) -> torch.Tensor:
        """The teacher temperature at ``epoch`` as an fp32 0-d tensor on the centre's device."""
        return torch.tensor(self.teacher_temp(epoch), dtype=torch.float32, device=self.center.device)

    def _forward(self, s: dict, t: dict, tau):
        a = self.alpha
        c = self.center
        t_cls = t["g_cls"].float()  # [2B, 1, K], rows [v2; v1]
        B2, _, K = t_cls.shape
        B = B2 // 2
        t_patch, t_m = t["g_patch"][0].float(), t["g_mask"][0].float()  # [2B, S, K], [2B, S, 1]
        tg_clsp = a * self._masked_mean(t_patch, t_m, 1).unsqueeze(1) + (1 - a) * t_cls
        has_local = "l_cls" in s and "l_patch" in t
        if has_local:
            nl = t["l_patch"].shape[0]
            tl_cls = t_cls.reshape(2, B, K).transpose(0, 1).repeat(nl, 1, 1)  # [nl*B, 2, K] views (v2, v1)
            lm = self._masked_mean(t["l_patch"].float(), t["l_mask"].float(), 2)  # [nl, 2B, K]
            lm = lm.reshape(nl, 2, B, K).transpose(1, 2).reshape(nl * B, 2, K)
            tl_clsp = a * lm + (1 - a) * tl_cls

        def probs(logits, j):
            return F.softmax((logits - c[j]) / tau, dim=-1)

        def ce(p, logits):
            return -(p * F.log_softmax(logits.float() / self.student_temp, dim=-1)).sum(-1)

        P = {"g_cls": probs(t_cls, 0), "g_clsp": probs(tg_clsp, 1), "g_patch": probs(t_patch, 2)}
        parts = {"g_cls": ce(P["g_cls"], s["g_cls"]).mean(), "g_clsp": ce(P["g_clsp"], s["g_clsp"]).mean()}
        s_m = s["g_mask"][0, ..., 0].float()  # [2B, S]
        parts["g_patch"] = (ce(P["g_patch"], s["g_patch"][0]) * s_m).sum() / s_m.sum().clamp_min(1e-6)
        n_g, n_l = 2, 0
        if has_local:
            P["l_cls"], P["l_clsp"] = probs(tl_cls, 0), probs(tl_clsp, 1)
            parts["l_cls"] = ce(P["l_cls"], s["l_cls"]).mean()
            parts["l_clsp"] = ce(P["l_clsp"], s["l_clsp"]).mean()
            n_l = 2 * nl
            cls = (n_g * parts["g_cls"] + n_l * parts["l_cls"]) / (n_g + n_l)
            clsp = (n_g * parts["g_clsp"] + n_l * parts["l_clsp"]) / (n_g + n_l)
        else:
            cls, clsp = parts["g_cls"], parts["g_clsp"]
        loss = (cls + clsp + parts["g_patch"]) / 3
        self.last_targets = {k: v.detach() for k, v in P.items()}
        with torch.no_grad():
            mu0 = t_cls.mean(dim=(0, 1))
            clsp_all = [tg_clsp.reshape(-1, K)] + ([tl_clsp.reshape(-1, K)] if has_local else [])
            mu1 = torch.cat(clsp_all).mean(0)
            num = (t_patch * t_m).sum(dim=(0, 1))
            den = t_m.sum()
            if has_local:
                num = num + (t["l_patch"].float() * t["l_mask"].float()).sum(dim=(0, 1, 2))
                den = den + t["l_mask"].float().sum()
            mu2 = num / den.clamp_min(1e-6)
            self.update_center(torch.stack([mu0, mu1, mu2]))
        parts = {k: v.detach() for k, v in parts.items()}
        parts["teacher_temp"] = tau.detach().clone() if isinstance(tau, torch.Tensor) else torch.tensor(tau)
        return loss, parts

    @torch.no_grad()
    def update_center(self, mu: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean; across processes an average of per-process means (as the official code)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mu)
            mu = mu / torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(mu.to(self.center.dtype), alpha=1 - self.center_momentum)
