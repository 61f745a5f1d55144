"""The :class:`Lamb` optimizer: gathers tensors from its param groups and calls :func:`~.functional.lamb`."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_effi.optim.functional import lamb_step, resolve_path

__all__ = ["Lamb"]

_GRAD = operator.attrgetter("grad")

_GROUP_DEFAULTS = dict(
    bias_correction=True, trust_clip=None, weight_norm_clip=None, max_grad_norm=None, adapt=True, foreach=None,
    fused=None
)


def _check_pair(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name} {value!r}: must be None or a pair (lo, hi)")
    lo, hi = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"Invalid {name} {value!r}: lo and hi must be numbers")
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise ValueError(f"Invalid {name} {value!r}: must satisfy 0 <= lo <= hi")


def _validate(group: dict) -> None:
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, Tensor):
        # A device-side schedule's learning rate (as torch's Adam/AdamW accept); its value is read once, here.
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid lr tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}: a tensor lr must be "
                             "a floating-point tensor with one element")
        if not float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate {float(lr)!r}: must be >= 0")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate {lr!r}: must be a float >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas {betas!r}: must be a pair (beta1, beta2)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta1 {betas[0]!r}: must be in [0, 1)")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta2 {betas[1]!r}: must be in [0, 1)")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"Invalid eps {eps!r}: must be >= 0 (1e-6 is the paper's choice)")
    if not isinstance(wd, (int, float)) or not wd >= 0.0:
        raise ValueError(f"Invalid weight_decay {wd!r}: must be >= 0")
    _check_pair("trust_clip", group["trust_clip"])
    _check_pair("weight_norm_clip", group["weight_norm_clip"])
    mgn = group["max_grad_norm"]
    if mgn is not None and (not isinstance(mgn, (int, float)) or isinstance(mgn, bool) or not mgn > 0.0):
        raise ValueError(f"Invalid max_grad_norm {mgn!r}: must be None (no clipping) or a float > 0")
    for key in ("bias_correction", "adapt"):
        if not isinstance(group[key], bool):
            raise TypeError(f"Invalid {key} {group[key]!r}: must be True or False")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach=True and fused=True are exclusive: pick one implementation path")
    if group["fused"] and "params" in group:
        # fused=True means the Triton kernel for CUDA parameters and the C++ kernel for CPU ones (as torch's
        # AdamW(fused=True) has a kernel for each).
        from lightning_effi.optim.cpu_kernel import cpu_kernel_unavailable_reason
        from lightning_effi.optim.fused import fused_unavailable_reason

        on_cpu = all(p.device.type == "cpu" for p in group["params"])  # a DTensor's .device is its local one
        reason = cpu_kernel_unavailable_reason(None) if on_cpu else fused_unavailable_reason(None)
        if reason is not None:
            raise RuntimeError(f"Lamb(fused=True) cannot run: {reason}. Use foreach=True (or leave fused=None)")


def _step_device(p: Tensor, path: str) -> torch.device:
    """Where a parameter's step count lives: on its device when the step runs there without host reads (the fused
    path, and every path on an accelerator), else on the CPU (the CPU paths read it)."""
    device = p.device  # a DTensor's .device is its local device
    return device if path == "fused" or device.type != "cpu" else torch.device("cpu")


class Lamb(Optimizer):
    r"""LAMB: layer-wise adaptive moments (You et al., arXiv:1904.00962, Algorithm 2), correct under sharding.

    Per parameter ``x`` with gradient ``g`` at step ``t``:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat m &= m / (1-\beta_1^t), \quad \hat v = v / (1-\beta_2^t) \quad \text{(when bias\_correction)} \\
        u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda x \\
        r &= \phi(\lVert x\rVert) / \lVert u\rVert \ \text{if adapt and both norms} > 0 \text{, else } 1 \\
        x &\leftarrow x - \eta\, r\, u

    ``φ`` is the identity, or ``clamp(·, lo, hi)`` with ``weight_norm_clip=(lo, hi)``; ``trust_clip=(lo, hi)``
    clamps a computed ratio (not the fallback 1). Weight decay sits inside the normalised direction, bias correction
    acts on the moments (not as a learning-rate factor), and there is no hidden gradient clipping.

    Args:
        params: parameters or param groups. Groups may override every option below and set ``adapt`` (default
            True; False fixes the ratio to 1, i.e. Adam with decoupled-in-direction decay for that group).
            Build groups with :func:`~lightning_effi.optim.param_groups`.
        lr: learning rate. Default ``1e-3``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``. Default ``(0.9, 0.999)``.
        eps: added to ``√v̂``. Default ``1e-6``.
        weight_decay: λ, inside the update direction. Default ``0.01``.
        bias_correction: divide the moments by ``1 - β^t``. Default True.
        trust_clip: ``(lo, hi)`` bounds on the trust ratio, or None. Default None.
        weight_norm_clip: ``(lo, hi)`` bounds on ``‖x‖`` in the ratio's numerator, or None. Default None.
        max_grad_norm: if set, gradients are scaled by ``min(1, max_grad_norm / global_norm)`` inside the step, the
            norm taken over all parameters of all groups and all shards; ``p.grad`` is never modified. A non-finite
            global norm skips the step (weights, moments and step counts unchanged; ``trust_ratios`` NaN). One value
            for the whole optimizer. Default None.
        foreach: use the multi-tensor path (on the CPU: torch's fused AdamW kernel on a scratch copy, then the
            update; no build step). Default None (foreach unless fused applies).
        fused: use a fused kernel: the Triton kernel for CUDA parameters, the C++ kernel
            (:mod:`~lightning_effi.optim.cpu_kernel`, built on first use) for CPU ones; on the CPU it steps unsharded
            float32/float64 parameters and the rest take the foreach path. Default None: fused where its kernel is
            available, foreach otherwise (on the CPU with one warning that says why). Asking for True where it
            cannot run raises with the reason.

    Sharding is detected, not configured: DTensor parameters (FSDP2, TP) get the norms of their full logical tensor
    with one all_reduce per step; flat ZeRO partitions are handled when a strategy sets ``group["flat_layouts"]``
    (:class:`~lightning_effi.optim.norms.FlatLayout`) and ``norm_process_group``. With ``max_grad_norm`` a sharded
    step needs a second all_reduce (the clip coefficient must be known before ``u``).

    Attributes:
        trust_ratios: after a step, a float32 tensor on the parameters' device, one entry per parameter updated in
            that step in param-group order (per logical parameter in flat mode); None before the first step. Not
            part of ``state_dict``; producing it needs no host sync.
        norm_process_group: flat mode only: the group over which flat partitions are sharded (None: the default
            group when torch.distributed is initialised).

    Every path accepts ``grad_scale``/``found_inf`` (``torch.amp.GradScaler``, ``LossScalingPrecision``) and a
    0-dim tensor ``lr`` on the parameters' device: on an accelerator, unscaling, the overflow skip and a device-side
    learning rate need no host sync (the CPU paths read them on the host).
    """

    # Contracts (lightning_effi._protocols): ZeRO strategies describe their flat partitions to it
    # (FlatLayoutOptimizer), and a held LR schedule writes 0-dim device learning rates (DeviceLROptimizer).
    accepts_flat_layouts = True
    accepts_tensor_lr = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        trust_clip: tuple[float, float] | None = None,
        weight_norm_clip: tuple[float, float] | None = None,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            trust_clip=None if trust_clip is None else tuple(trust_clip),
            weight_norm_clip=None if weight_norm_clip is None else tuple(weight_norm_clip),
            max_grad_norm=max_grad_norm,
            adapt=True,
            foreach=foreach,
            fused=fused,
        )
        _validate(defaults)
        super().__init__(params, defaults)
        self.trust_ratios: Tensor | None = None
        self.norm_process_group = None
        # Every path takes grad_scale/found_inf (torch.amp.GradScaler and LossScalingPrecision hand them to
        # optimizers that set this, see torch.optim.Adam) and a 0-dim device tensor lr, so a loss-scaled step and a
        # device-side schedule need no host sync on an accelerator.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("trust_clip", "weight_norm_clip", "betas"):
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        _validate(group)
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError(
                f"Invalid max_grad_norm {group['max_grad_norm']!r} in a param group: the clipping norm is global over "
                f"all groups, so it can only be set on the optimizer (got {self.defaults['max_grad_norm']!r} there)"
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        for s in self.state.values():
            # States written by older versions stored the step as a Python number.
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)
        self.__dict__.setdefault("trust_ratios", None)
        self.__dict__.setdefault("norm_process_group", None)
        self.__dict__.setdefault("_step_supports_amp_scaling", True)

    def state_dict(self):
        # flat_layouts are strategy wiring, rebuilt by the strategy; they are not optimizer state.
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("flat_layouts", None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch replaces the param groups with the saved ones, which never carry flat_layouts (strategy wiring);
        # keep the live layouts, or a ZeRO optimizer reloaded in place would treat flat partitions as plain tensors.
        layouts = [g.get("flat_layouts") for g in self.param_groups]
        ws = self._workspace()
        ws.pop("prepared", None)
        ws.pop("replay", None)
        self.__dict__["_effi_state_version"] = self.__dict__.get("_effi_state_version", 0) + 1
        super().load_state_dict(state_dict)
        for g, lay in zip(self.param_groups, layouts):
            if lay is not None:
                g["flat_layouts"] = lay

    def _init_group(self, group: dict, path: str, lists: dict) -> None:
        layouts = group.get("flat_layouts")
        hyper = [(key, group[key]) for key in
                 ("lr", "eps", "weight_decay", "adapt", "bias_correction", "trust_clip", "weight_norm_clip")]
        beta1, beta2 = group["betas"]
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError("Lamb does not support complex parameters (the trust ratio needs real norms)")
            state = self.state[p]
            step_device = _step_device(p, path)
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != step_device:
                # A checkpoint written on another path (or loaded by torch's policy) keeps 'step' elsewhere.
                state["step"] = state["step"].to(step_device, torch.float32)
            lists["params"].append(p)
            lists["grads"].append(p.grad)
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_avg_sqs"].append(state["exp_avg_sq"])
            lists["state_steps"].append(state["step"])
            for key, value in hyper:
                lists[key].append(value)
            lists["beta1"].append(beta1)
            lists["beta2"].append(beta2)
            if layouts is not None:
                lists["flat_layouts"].append(layouts[j])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        ratios = self._replay(grad_scale, found_inf)
        if ratios is not None:
            self.trust_ratios = ratios
            return loss
        flat = [("flat_layouts" in g) for g in self.param_groups]
        if any(flat) and not all(flat):
            raise RuntimeError(
                "Lamb: some param groups have flat_layouts and others do not; a ZeRO strategy must describe every "
                "flat partition (set group['flat_layouts'] on all groups)"
            )
        for g in self.param_groups:
            if "flat_layouts" in g and len(g["flat_layouts"]) != len(g["params"]):
                raise RuntimeError(
                    f"group['flat_layouts'] has {len(g['flat_layouts'])} entries for {len(g['params'])} params"
                )
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            return loss
        path, lists = self._prepared(with_grad)
        self.trust_ratios = lamb_step(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["state_steps"],
            lr=lists["lr"],
            beta1=lists["beta1"],
            beta2=lists["beta2"],
            eps=lists["eps"],
            weight_decay=lists["weight_decay"],
            adapt=lists["adapt"],
            bias_correction=lists["bias_correction"],
            trust_clip=lists["trust_clip"],
            weight_norm_clip=lists["weight_norm_clip"],
            max_grad_norm=self.defaults["max_grad_norm"],
            flat_layouts=lists["flat_layouts"] if any(flat) else None,
            norm_process_group=self.norm_process_group,
            grad_scale=grad_scale,
            found_inf=found_inf,
            path=path,
            workspace=self._workspace(),
        )
        self._remember_replay(with_grad, path, grad_scale, found_inf)
        return loss

    def _hyper_token(self) -> tuple:
        return (self.__dict__.get("_effi_state_version", 0), self.defaults["max_grad_norm"], tuple(
            (g["betas"], g["eps"], g["weight_decay"], g["adapt"], g["bias_correction"], g["trust_clip"],
             g["weight_norm_clip"], g["foreach"], g["fused"], "flat_layouts" in g, len(g["params"]))
            for g in self.param_groups))

    def _remember_replay(self, with_grad: list, path: str, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """After a fused step that left a captured graph: what the graph reads, so the next steps can replay it."""
        ws = self._workspace()
        cache = ws.get("lamb_fused")
        if path != "fused" or cache is None or cache.graph is None:
            ws.pop("replay", None)
            return
        param_ptrs = list(map(Tensor.data_ptr, with_grad))
        hyper = self._hyper_token()
        mode = (found_inf is not None, grad_scale is not None, self.defaults["max_grad_norm"])
        hit = ws.get("replay")
        if (hit is None or hit["cache"] is not cache or len(hit["params"]) != len(with_grad)
                or not all(map(operator.is_, with_grad, hit["params"])) or hit["param_ptrs"] != param_ptrs
                or hit["hyper"] != hyper or hit["mode"] != mode):
            counts = [sum(1 for p in g["params"] if p.grad is not None) for g in self.param_groups]
            group_of_unit = [i for i, c in enumerate(counts) for _ in range(c)]
            device = cache.lr_t.device
            ws["replay"] = dict(
                cache=cache, params=with_grad,
                every=len(with_grad) == sum(len(g["params"]) for g in self.param_groups),
                param_ptrs=param_ptrs, hyper=hyper, mode=mode, counts=counts,
                unit_group=torch.tensor(group_of_unit, dtype=torch.long).pin_memory().to(device, non_blocking=True),
            )

    def _replay(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
        """The fused step straight from a captured CUDA graph when nothing it reads has changed: the same parameter
        and state tensors at the same addresses, the same hyperparameters. Gradients are new tensors every step, at
        addresses that may change: the graph's offset tables are pointed at them (fused.retarget). This skips the
        per-tensor preparation of a step, host time during which a GPU that waits for the step idles; only the
        learning rates are brought up to date. The checks run before the graph's first kernel can start, so they are
        C-level passes over the parameters."""
        ws = self._workspace()
        hit: Any = ws.get("replay")
        if hit is None:
            return None
        mode = hit["mode"]
        params = hit["params"]
        fc: Any = hit["cache"]
        if (mode[:2] != (found_inf is not None, grad_scale is not None) or self._hyper_token() != hit["hyper"]
                or hit["cache"] is not ws.get("lamb_fused") or fc.graph is None or fc.graph_mode != mode):
            ws.pop("replay", None)
            return None
        if hit["every"]:  # every parameter had a gradient: the groups' own lists, in order (their lengths are in hyper)
            same = all(map(operator.is_, itertools.chain.from_iterable([g["params"] for g in self.param_groups]),
                           params))
            grads = list(map(_GRAD, params))
            try:
                grad_ptrs = tuple(map(Tensor.data_ptr, grads))
            except TypeError:  # a parameter without a gradient this step
                same = False
        else:
            with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            same = len(with_grad) == len(params) and all(map(operator.is_, with_grad, params))
            grads = [p.grad for p in with_grad] if same else []
            grad_ptrs = tuple(map(Tensor.data_ptr, grads))
        if not same or list(map(Tensor.data_ptr, params)) != hit["param_ptrs"]:
            ws.pop("replay", None)
            return None
        from lightning_effi.optim.fused import replay, retarget

        if grad_ptrs != fc.grad_ptrs and (not retarget(fc, grads, grad_ptrs, mode[2] is not None)
                                          or fc.graph is None):
            ws.pop("replay", None)
            return None  # the eager path rebuilds the plan or captures the graph again

        lrs = [g["lr"] for g in self.param_groups]
        if any(isinstance(lr, Tensor) for lr in lrs):  # device learning rates: gathered on the device
            vec = torch.stack([lr.reshape(()).to(fc.lr_t.device, torch.float64) if isinstance(lr, Tensor)
                               else torch.full((), float(lr), dtype=torch.float64, device=fc.lr_t.device)
                               for lr in lrs])
            fc.lr_t.copy_(vec[hit["unit_group"]])
            fc.lr_key = fc.group_lrs = None
        elif tuple(lrs) != fc.group_lrs:
            per_unit = [lr for lr, c in zip(lrs, hit["counts"]) for _ in range(c)]
            fc.lr_t.copy_(torch.tensor(per_unit, dtype=torch.float64).pin_memory(), non_blocking=True)
            fc.lr_key, fc.group_lrs = tuple(per_unit), tuple(lrs)
        fc.hits += 1
        return replay(fc, grad_scale, found_inf)

    _KEYS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "lr", "beta1", "beta2", "eps",
             "weight_decay", "adapt", "bias_correction", "trust_clip", "weight_norm_clip", "flat_layouts")

    def _prepared(self, with_grad: list) -> tuple[str, dict]:
        """The per-parameter lists for :func:`lamb`. Everything but the gradients, the state tensors and the learning
        rates is cached while the set of parameters with gradients and the groups' other hyperparameters are
        unchanged: rebuilding the lists for every parameter on every step is host time in which a GPU that finished
        the backward pass waits for the optimizer's first kernel."""
        ws = self._workspace()
        # Devices and dtypes too: a module moved with .to() keeps its parameter objects but may need another path.
        key = (tuple(map(id, with_grad)), tuple((p.device, p.dtype) for p in with_grad), tuple(
            (g["betas"], g["eps"], g["weight_decay"], g["adapt"], g["bias_correction"], g["trust_clip"],
             g["weight_norm_clip"], g["foreach"], g["fused"], id(g.get("flat_layouts")), len(g["params"]))
            for g in self.param_groups))
        hit = ws.get("prepared")
        if hit is not None and hit[0] == key:
            _, path, lists, counts = hit
            states = self.state
            m, v, st = [], [], []
            for p in with_grad:
                s_ = states.get(p)
                if not s_ or "exp_avg" not in s_:
                    break
                step = s_["step"]
                if step.device != _step_device(p, path):
                    break
                m.append(s_["exp_avg"])
                v.append(s_["exp_avg_sq"])
                st.append(step)
            else:
                lr: list = []
                for g, c in zip(self.param_groups, counts):
                    lr += [g["lr"]] * c
                out = dict(lists, grads=[p.grad for p in with_grad], exp_avgs=m, exp_avg_sqs=v, state_steps=st,
                           lr=lr)
                return path, out
        g0 = self.param_groups[0]
        path = resolve_path(with_grad, g0["foreach"], g0["fused"])
        built: dict[str, list] = {k: [] for k in self._KEYS}
        counts = []
        for group in self.param_groups:
            before = len(built["params"])
            self._init_group(group, path, built)
            counts.append(len(built["params"]) - before)
        static = {k: v for k, v in built.items() if k not in ("grads", "exp_avgs", "exp_avg_sqs", "state_steps", "lr")}
        ws["prepared"] = (key, path, static, counts)
        return path, built

    def _workspace(self) -> dict[str, Any]:
        # Per-optimizer caches reused across steps: the prepared lists (_prepared), the CPU path's scratch buffer,
        # the fused path's step plan and CUDA graph. Not optimizer state: never saved, copied or pickled.
        ws = self.__dict__.get("_effi_workspace")
        if ws is None:
            ws = self.__dict__["_effi_workspace"] = {}
        return ws

