"""FSDP2 (fully_shard, gloo, 2 ranks) + Lamb vs single-process Lamb on the same global batch. Run with torchrun.

Each rank trains on its half of the global batch; FSDP2 averages gradients, so the step equals the single-process
one. Per step we record the largest difference between the gathered parameters and the reference's, the trust
ratios, and how many all_reduce calls Lamb's step made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_exit  # noqa: E402
from lamb_common import (  # noqa: E402
    GLOBAL_BATCH,
    STEPS,
    CountAllReduce,
    batch,
    groups,
    loss_fn,
    make_lamb,
    make_model,
    reference_run,
    write,
)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    result = {}
    for label, mgn in (("clip", 0.05), ("noclip", None)):
        ref = reference_run(mgn)
        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        local_sizes = {n: p.to_local().numel() for n, p in model.named_parameters()}
        opt = make_lamb(groups(model), mgn)
        per = GLOBAL_BATCH // world
        diffs, ratio_diffs, counts = [], [], []
        for step in range(STEPS):
            x, y = batch(step)
            model.zero_grad()
            loss_fn(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
            with CountAllReduce() as c:
                opt.step()
            counts.append(c.n)
            ref_params, ref_ratios, _ = ref[step]
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            diffs.append(max(float((full[n].detach() - ref_params[n]).abs().max()) for n in full))
            ratio_diffs.append(float((opt.trust_ratios - ref_ratios).abs().max()))
        state = opt.state[next(iter(model.parameters()))]
        result[label] = dict(
            max_param_diff=max(diffs), max_ratio_diff=max(ratio_diffs), allreduce_per_step=counts,
            local_sizes=local_sizes, min_ref_grad_norm=min(r[2] for r in ref), ref_ratios=ref[-1][1].tolist(),
            state_is_dtensor=isinstance(state["exp_avg"], DTensor),
        )
    write(out_dir, rank, result)
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1])
