"""ZeRO-like flat partitions (gloo, 2 ranks) + Lamb with FlatLayouts vs single-process Lamb. Run with torchrun.

Per param group, all parameters are concatenated into one flat buffer padded to a multiple of the world size; rank r
owns the r-th contiguous slice (so some parameters are split across ranks). The FlatLayouts describe which logical
parameter each piece is; the flat gradient partition is the same slice of the full flat gradient. After each step
the partitions are all-gathered back into the model (what ZeRO does), and compared with the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import clean_exit  # noqa: E402
from lamb_common import STEPS, CountAllReduce, batch, groups, loss_fn, make_lamb, make_model, reference_run, write  # noqa: E402

from lightning_effi.optim import FlatLayout  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {}
    for label, mgn in (("clip", 0.05), ("noclip", None)):
        ref = reference_run(mgn)
        model = make_model()
        name_of = {id(p): n for n, p in model.named_parameters()}
        grps = groups(model)
        num_logical = sum(len(g["params"]) for g in grps)
        flat_groups, parts, layouts, spans = [], [], [], []
        lid = 0
        split = 0
        for g in grps:
            total = sum(p.numel() for p in g["params"])
            padded = -(-total // world) * world
            h = padded // world
            lo, hi = rank * h, (rank + 1) * h
            segs, off, span = [], 0, []
            for p in g["params"]:
                n = p.numel()
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    segs.append((lid, a - lo, b - a))
                if off < lo < off + n or off < hi < off + n:
                    split += 1
                span.append((p, off, n))
                off += n
                lid += 1
            flat = torch.zeros(padded)
            for p, o, n in span:
                flat[o : o + n] = p.detach().reshape(-1)
            part = torch.nn.Parameter(flat[lo:hi].clone())
            parts.append(part)
            spans.append((span, padded, lo, hi))
            layouts.append(FlatLayout(segments=tuple(segs), num_logical=num_logical))
            flat_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [part]})
        opt = make_lamb(flat_groups, mgn)
        for g, lay in zip(opt.param_groups, layouts):
            g["flat_layouts"] = [lay]
        opt.norm_process_group = dist.group.WORLD
        diffs, ratio_diffs, counts = [], [], []
        for step in range(STEPS):
            model.zero_grad()
            loss_fn(model, *batch(step)).backward()  # every rank: the full batch, so full gradients agree
            for part, (span, padded, lo, hi) in zip(parts, spans):
                fg = torch.zeros(padded)
                for p, o, n in span:
                    fg[o : o + n] = p.grad.reshape(-1)
                part.grad = fg[lo:hi].clone()
            with CountAllReduce() as c:
                opt.step()
            counts.append(c.n)
            with torch.no_grad():
                for part, (span, _, _, _) in zip(parts, spans):
                    gathered = [torch.empty_like(part) for _ in range(world)]
                    dist.all_gather(gathered, part.detach())
                    full = torch.cat(gathered)
                    for p, o, n in span:
                        p.copy_(full[o : o + n].view_as(p))
            ref_params, ref_ratios, _ = ref[step]
            diffs.append(max(float((p.detach() - ref_params[name_of[id(p)]]).abs().max()) for p in model.parameters()))
            ratio_diffs.append(float((opt.trust_ratios - ref_ratios).abs().max()))
        result[label] = dict(
            max_param_diff=max(diffs), max_ratio_diff=max(ratio_diffs), allreduce_per_step=counts,
            n_ratios=int(opt.trust_ratios.numel()), num_logical=num_logical, params_split_across_ranks=split,
            min_ref_grad_norm=min(r[2] for r in ref),
            state_flat=all(opt.state[p]["exp_avg"].shape == p.shape for p in parts),
        )
    write(out_dir, rank, result)
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1])
