"""DynamicLossScaler on FSDP2 (plain ``fully_shard``, DTensor grads), 2 processes under torchrun, gloo, no Lightning.

Rank 1 writes an inf/nan into its *local shard* of one gradient at chosen steps; rank 0's shards stay finite. Every
rank also runs the same model unsharded on the global batch as the reference (SGD, fp32), skipping exactly the injected
steps. Writes ``<out>/rank<r>.json``: skip flags, scales, the largest unscaled-gradient and final-weight differences
against the reference.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clean_exit  # noqa: E402

from lightning_effi.plugins.scaler import DynamicLossScaler  # noqa: E402

INJECT = {2: "inf", 4: "nan", 5: "inf"}
N_STEPS = 8
KNOBS = dict(init_scale=2.0**10, growth_interval=2, hysteresis=1)


def main(out: Path, optimizer: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5))  # 5 rows: shards of 3 and 2 rows
    ref = copy.deepcopy(net).double()
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    if optimizer == "adamw_fused":
        # skips inside its kernel: the scaler hands it the overflow flag and reads nothing on the host
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = DynamicLossScaler(**KNOBS)
    g = torch.Generator().manual_seed(1)
    rec = {"skipped": [], "scales": [], "grad_err": 0.0, "dtensor_grads": True}
    for step in range(N_STEPS):
        x = torch.randn(8, 8, generator=g)
        y = torch.randn(8, 5, generator=g)
        mine = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x[mine]), y[mine])
        scaler.scale(loss).backward()
        if step in INJECT and rank == 1:
            local = dict(net.named_parameters())["2.weight"].grad.to_local()
            local.view(-1)[0] = float(INJECT[step])
        rec["dtensor_grads"] &= all(type(p.grad).__name__ == "DTensor" for p in net.parameters())
        scaler.unscale_(opt)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x.double()), y.double()).backward()
        if step not in INJECT:
            for p, q in zip(net.parameters(), ref.parameters()):
                full = p.grad.full_tensor().double()
                rec["grad_err"] = max(rec["grad_err"], float((full - q.grad).abs().max() / q.grad.abs().max()))
            ref_opt.step()
        scaler.step(opt)
        scaler.update()
        rec["skipped"].append(scaler.last_step_skipped)
        rec["scales"].append(scaler.get_scale())
    rec["weight_err"] = max(
        float((p.full_tensor().double() - q).abs().max()) for p, q in zip(net.parameters(), ref.parameters())
    )
    rec["skipped_steps"] = scaler.skipped_steps
    rec["masked"] = scaler.masks_step(opt)
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    clean_exit()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "sgd")
