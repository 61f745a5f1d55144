"""A float64 LAMB written from the paper (arXiv:1904.00962, Algorithm 2) and issue 3's statement of it.

Deliberately naive: one parameter at a time, no foreach, no views, no shared code with lightning_effi.optim.
"""

from __future__ import annotations

import math

import torch


class ReferenceLamb:
    def __init__(self, params, groups, max_grad_norm=None):
        """params: list of tensors (copied to float64); groups: dicts with 'idx' (param indices) and hyperparameters
        lr, betas, eps, weight_decay, bias_correction, trust_clip, weight_norm_clip, adapt."""
        self.x = [p.detach().cpu().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.t = [0 for _ in self.x]
        self.groups = groups
        self.max_grad_norm = max_grad_norm

    def step(self, grads):
        """grads: list (aligned with params) of tensors or None. Returns the trust ratios of updated params, in
        group order, or None for a skipped step."""
        g64 = [None if g is None else g.detach().cpu().to(torch.float64) for g in grads]
        coef = 1.0
        if self.max_grad_norm is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in g64 if g is not None))
            if not math.isfinite(total):
                return None
            coef = min(1.0, self.max_grad_norm / total) if total > 0 else 1.0
        ratios = []
        for grp in self.groups:
            b1, b2 = grp["betas"]
            for i in grp["idx"]:
                g = g64[i]
                if g is None:
                    continue
                g = g * coef
                self.t[i] += 1
                t = self.t[i]
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                if grp["bias_correction"]:
                    mh, vh = self.m[i] / (1 - b1**t), self.v[i] / (1 - b2**t)
                else:
                    mh, vh = self.m[i], self.v[i]
                u = mh / (vh.sqrt() + grp["eps"]) + grp["weight_decay"] * self.x[i]
                xn, un = float(self.x[i].norm()), float(u.norm())
                ratio = 1.0
                if grp["adapt"] and xn > 0 and un > 0:
                    phi = xn
                    if grp["weight_norm_clip"] is not None:
                        lo, hi = grp["weight_norm_clip"]
                        phi = min(max(xn, lo), hi)
                    ratio = phi / un
                    if grp["trust_clip"] is not None:
                        lo, hi = grp["trust_clip"]
                        ratio = min(max(ratio, lo), hi)
                self.x[i] = self.x[i] - grp["lr"] * ratio * u
                ratios.append(ratio)
        return ratios
