"""fp16 on CUDA: the same checks as the CPU suite where the hardware differs (run with ``pytest -m gpu``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_effi.optim import Lamb
from lightning_effi.plugins import DynamicLossScaler, LossScalingPrecision, MasterWeightsPrecision
from tests.plugins._toy import StepRecorder, ToyModule, fit, reference_scales

pytestmark = pytest.mark.gpu


def test_unscale_has_no_host_sync_and_step_has_one():
    dtypes = (torch.float16, torch.float32, torch.bfloat16) * 2
    ps = [torch.nn.Parameter(torch.randn(1000, device="cuda", dtype=dt)) for dt in dtypes]
    opt = torch.optim.SGD(ps, lr=0.1)
    s = DynamicLossScaler(init_scale=2.0**8)
    for p in ps:
        p.grad = torch.randn_like(p) * 2.0**8
    ps[3].grad[7] = float("inf")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flag = s.unscale_(opt)  # must not synchronize: one fused check per (device, dtype), flag stays on device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.device.type == "cuda" and flag.item() == 1.0
    assert s.step(opt) is None
    s.update()
    assert s.last_step_skipped


@pytest.mark.parametrize("optimizer", ["adamw", "lamb_fused"])
def test_fp16_cuda_injected_overflow(optimizer):
    inject = {0: "inf", 3: "nan", 4: "inf", 8: "inf"}
    n = 12

    class M(ToyModule):
        def configure_optimizers(self):
            if optimizer == "adamw":
                return super().configure_optimizers()
            opt = Lamb(self.parameters(), lr=1e-2, fused=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.8**k)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = M(inject=inject, lr_decay=0.8)
    rec = StepRecorder()
    plugin = LossScalingPrecision("16-mixed", init_scale=2.0**10, growth_interval=3, hysteresis=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(module, plugins=[plugin], callbacks=[rec], max_steps=n, accelerator="cuda")
    assert not [w for w in records if "lr_scheduler.step()" in str(w.message)]
    assert plugin.device == "cuda" and set(module.autocast_dtypes) == {torch.float16}
    flags = [s in inject for s in range(n)]
    assert [r["weights_same"] for r in rec.rows] == flags
    assert [r["state_same"] for r in rec.rows] == flags
    assert [r["scale"] for r in rec.rows] == reference_scales(
        flags, init=2.0**10, growth=2.0, backoff=0.5, interval=3, hysteresis=2, lo=1.0, hi=2.0**24, consecutive=False)
    applied = [sum(not f for f in flags[: i + 1]) for i in range(n)]
    assert [r["sched_pos"] for r in rec.rows] == applied


def test_master_weights_cuda_memory_and_accuracy():
    from tests.plugins.test_master_weights import N_STEPS, _gpt, _model_weights

    runs = {}
    for name, kw in {"fp32": {}, "bf16-true": dict(precision="bf16-true"),
                     "master": dict(plugins=[MasterWeightsPrecision("fp32")]),
                     "kahan": dict(plugins=[MasterWeightsPrecision("kahan")])}.items():
        module = _gpt("lamb")
        w0 = _model_weights(module).clone()
        fit(module, max_steps=N_STEPS, accelerator="cuda", **kw)
        if name != "fp32" and name != "bf16-true":
            assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
            # (Lightning's teardown moves a single-device module back to the CPU, so the device is not checked here.)
        runs[name] = (w0, _model_weights(module).cpu())
    w32 = runs["fp32"][1]
    travel = (w32 - runs["fp32"][0].cpu()).norm()
    err = {k: ((w - w32).norm() / travel).item() for k, (_, w) in runs.items() if k != "fp32"}
    assert err["master"] < 0.4 * err["bf16-true"] and err["kahan"] < 0.4 * err["bf16-true"], err
