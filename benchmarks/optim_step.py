"""Optimizer step time: lightning_effi's Lamb beside its peers, on one set of GPT-shaped fp32 tensors, in one run.

    python benchmarks/optim_step.py --device cuda            # 355M params, GPT-2 medium shapes (24 x d1024, V 50257)
    python benchmarks/optim_step.py --device cpu             # ~27M params (6 x d512, V 16000)

The floor is the step's unavoidable traffic for an Adam-family optimizer, 28 bytes per fp32 parameter (read x, g, m,
v; write x, m, v), divided by the copy bandwidth measured in the same run (bytes read + written by a large
device-to-device copy). Every optimizer gets its own fresh copies of the same tensors (gradients are shared: no
optimizer here writes them), repetitions are interleaved across optimizers (one step of each, round robin) so drift
on a shared machine hits all alike, and the report gives medians and ratios. A peer that is not installed is
skipped and named in the output. Raw JSON goes to --out.

On CUDA two timings per optimizer: one step between CUDA events after a full sync (includes the host latency before
the first kernel: the GPU idles while Python prepares the step), and the steady state, 5 steps back to back between
events (as in training, where the step's launches queue behind the backward pass and its host work overlaps the
GPU), with the host time per step measured around the launches.

Extra candidates on CUDA, for choosing the fused implementation by measurement: the Triton kernel at several block
sizes, and a torch.compile'd LAMB step (measured on a subset of layers, since compiling hundreds of tensors takes
minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_effi.optim import Lamb


def gpt_shapes(n_layer: int, d: int, vocab: int, block: int = 1024) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Bytes read + written per second by a large copy (median of reps)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def peers(device, args):
    """name -> (factory(params) -> optimizer, or None, reason when missing)."""
    out = {}
    lamb_kw = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    out["effi.Lamb(default)"] = (lambda ps: Lamb(ps, **lamb_kw), None)
    out["effi.Lamb(foreach)"] = (lambda ps: Lamb(ps, foreach=True, **lamb_kw), None)
    if device.type == "cuda":
        out["effi.Lamb(fused)"] = (lambda ps: Lamb(ps, fused=True, **lamb_kw), None)
    out["torch.AdamW(fused)"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True), None)
    out["torch.AdamW(foreach)"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True), None)
    try:
        from timm.optim import Lamb as TimmLamb

        out["timm.Lamb"] = (lambda ps: TimmLamb(ps, lr=1e-3, weight_decay=0.01), None)
    except ImportError as e:
        out["timm.Lamb"] = (None, f"not installed ({e})")
    try:
        import torch_optimizer

        out["torch_optimizer.Lamb"] = (lambda ps: torch_optimizer.Lamb(ps, lr=1e-3, weight_decay=0.01), None)
    except ImportError as e:
        out["torch_optimizer.Lamb"] = (None, f"not installed ({e})")
    if device.type == "cuda":
        try:
            from deepspeed.ops.lamb import FusedLamb

            out["deepspeed.FusedLamb"] = (lambda ps: FusedLamb(ps, lr=1e-3, weight_decay=0.01), None)
        except Exception as e:  # noqa: BLE001 - any failure to build/import the op means "not available here"
            out["deepspeed.FusedLamb"] = (None, f"not available ({type(e).__name__}: {e})"[:200])
    return out


def make_tensors(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device) * 1e-3 for s in shapes]
    return params, grads


FAILED: dict[str, str] = {}
# CUDA: per optimizer (steady-state step seconds, host seconds per step) of the last bench() call.
STEADY_RESULTS: dict[str, tuple[float, float]] = {}
STEADY = 5


def bench(shapes, device, names, factories, reps, warmup):
    base_p, grads = make_tensors(shapes, device)
    opts = {}
    failed = {}
    for name in list(names):
        ps = [torch.nn.Parameter(p.clone()) for p in base_p]
        for p, g in zip(ps, grads):
            p.grad = g
        try:
            opts[name] = factories[name](ps)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built (e.g. a JIT op) is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            names = [n for n in names if n != name]
    for name in list(names):  # warm-up: kernels compiled, state allocated; a peer that fails is reported, not fatal
        try:
            for _ in range(warmup):
                opts[name].step()
            sync(device)
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"peer {name} failed: {failed[name]}", flush=True)
            names = [n for n in names if n != name]
            del opts[name]
    FAILED.update(failed)
    times = {name: [] for name in names}
    steady = {name: [] for name in names}
    host = {name: [] for name in names}
    sync(device)
    for _ in range(reps):
        for name in names:
            if device.type == "cuda":
                # Steady state: STEADY steps back to back, as in training, where the optimizer's launches queue
                # behind the backward pass and its host work overlaps the GPU. perf_counter around the launches
                # alone is the host time per step.
                sync(device)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                h0 = time.perf_counter()
                for _ in range(STEADY):
                    opts[name].step()
                h1 = time.perf_counter()
                b.record()
                b.synchronize()
                steady[name].append(a.elapsed_time(b) / 1e3 / STEADY)
                host[name].append((h1 - h0) / STEADY)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                opts[name].step()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                opts[name].step()
                times[name].append(time.perf_counter() - t0)
    del opts
    if any(steady.values()):
        STEADY_RESULTS.clear()
        STEADY_RESULTS.update({n: (statistics.median(steady[n]), statistics.median(host[n])) for n in names})
    return {name: statistics.median(ts) for name, ts in times.items()}, {n: ts for n, ts in times.items()}


def compiled_lamb_factory():
    """A torch.compile'd LAMB step (one group, no sharding): the alternative to the Triton kernel."""

    @torch.compile(dynamic=False)
    def step(ps, gs, ms, vs, bc1, bc2, lr: float, b1: float, b2: float, eps: float, wd: float):
        for p, g, m, v in zip(ps, gs, ms, vs):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            u = (m / bc1) / (torch.sqrt(v / bc2) + eps) + wd * p
            pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
            r = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
            p.sub_(lr * r * u)

    class Compiled(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01})
            ps = self.param_groups[0]["params"]
            self.t = torch.zeros((), device=ps[0].device)
            self.ms = [torch.zeros_like(p) for p in ps]
            self.vs = [torch.zeros_like(p) for p in ps]

        @torch.no_grad()
        def step(self):
            g = self.param_groups[0]
            ps = g["params"]
            self.t += 1
            bc1, bc2 = 1 - 0.9**self.t, 1 - 0.999**self.t
            step(ps, [p.grad for p in ps], self.ms, self.vs, bc1, bc2, g["lr"], 0.9, 0.999, g["eps"], 0.01)

    return Compiled


def fused_breakdown(shapes, device):
    """Where the fused step's time goes: the two Triton kernels re-launched alone (do_bench, same arguments) vs the
    whole step. The difference is host work (plan, tables) plus the small device ops between the kernels."""
    import triton

    import lightning_effi.optim.fused as fused_mod

    params, grads = make_tensors(shapes, device)
    ps = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    opt = Lamb(ps, fused=True, lr=1e-3, weight_decay=0.01)
    opt.step()
    launches = []
    real = {k: getattr(fused_mod, k) for k in ("_phase1_kernel", "_phase2_kernel")}

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def call(*a, **k):
                launches.append((self.name, grid, a, k))
                return real[self.name][grid](*a, **k)
            return call

    for k in real:
        setattr(fused_mod, k, Rec(k))
    try:
        opt.step()
    finally:
        for k, v in real.items():
            setattr(fused_mod, k, v)
    out = {"step_ms": triton.testing.do_bench(opt.step, warmup=50, rep=300, return_mode="median")}
    for i, (name, grid, a, k) in enumerate(launches):
        out[f"{i}:{name}:{'masked' if k.get('MASKED') else 'full'}:{grid[0]}blocks"] = triton.testing.do_bench(
            lambda name=name, grid=grid, a=a, k=k: real[name][grid](*a, **k), warmup=50, rep=300,
            return_mode="median")
    out["kernels_ms"] = sum(v for key, v in out.items() if ":" in key)
    out["host_and_small_ops_ms"] = out["step_ms"] - out["kernels_ms"]
    # Where the host time goes (Python functions by own time, per step), for the sync-after-each-step gap.
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(20):
        opt.step()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    out["host_profile_ms_per_step"] = {f"{Path(k[0]).name}:{k[1]}:{k[2]}": round(v[2] / 20 * 1e3, 4) for k, v in rows}
    out["host_total_ms_per_step_profiled"] = round(st.total_tt / 20 * 1e3, 4)
    del opt, ps, params, grads
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--blocks", default="65536:1024:4,65536:2048:8,131072:2048:8,32768:4096:8,8192:8192:8",
                    help="fused kernel CHUNK:BLOCK:num_warps configurations to sweep (cuda)")
    ap.add_argument("--compile-layers", type=int, default=4, help="layers for the compiled-vs-Triton check (cuda)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        shapes, label = gpt_shapes(24, 1024, 50257), "GPT-2 medium (24 x d1024, vocab 50257)"
        reps = args.reps or 20
        bw = copy_bandwidth(device, 2 << 30, 20)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        shapes, label = gpt_shapes(6, 512, 16000), "scaled-down GPT (6 x d512, vocab 16000)"
        reps = args.reps or 7
        bw = copy_bandwidth(device, 256 << 20, 10)
    n_params = sum(math.prod(s) for s in shapes)
    floor = 28 * n_params / bw
    facts = peers(device, args)
    names = [n for n, (f, _) in facts.items() if f is not None]
    missing = {n: why for n, (f, why) in facts.items() if f is None}
    factories = {n: f for n, (f, _) in facts.items() if f is not None}
    medians, raw = bench(shapes, device, names, factories, reps, args.warmup)
    steady = dict(STEADY_RESULTS)
    missing.update({n: f"failed: {why}" for n, why in FAILED.items()})
    names = [n for n in names if n in medians]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": (torch.cuda.get_device_name() if device.type == "cuda"
                    else platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "tensors": label,
        "n_params": n_params,
        "copy_bandwidth_GBps": bw / 1e9,
        "floor_ms": floor * 1e3,
        "median_ms": {n: t * 1e3 for n, t in medians.items()},
        "x_floor": {n: t / floor for n, t in medians.items()},
        "skipped": missing,
        "raw_ms": {n: [t * 1e3 for t in ts] for n, ts in raw.items()},
    }
    ref = "torch.AdamW(fused)"
    result["x_adamw_fused"] = {n: t / medians[ref] for n, t in medians.items()}
    if steady:
        result["steady_ms"] = {n: v[0] * 1e3 for n, v in steady.items()}
        result["steady_x_floor"] = {n: v[0] / floor for n, v in steady.items()}
        result["steady_x_adamw_fused"] = {n: v[0] / steady[ref][0] for n, v in steady.items()}
        result["host_ms_per_step"] = {n: v[1] * 1e3 for n, v in steady.items()}
    if device.type == "cuda":
        import lightning_effi.optim.fused as fused_mod

        sweep = {}
        default = fused_mod.CHUNK, fused_mod.BLOCK, fused_mod.NUM_WARPS
        for cfg in args.blocks.split(","):
            fused_mod.CHUNK, fused_mod.BLOCK, fused_mod.NUM_WARPS = (int(v) for v in cfg.split(":"))
            f = {"fused": lambda ps: Lamb(ps, fused=True, lr=1e-3, weight_decay=0.01)}
            m, _ = bench(shapes, device, ["fused"], f, max(5, reps // 3), args.warmup)
            sweep[cfg] = ({"sync_ms": m["fused"] * 1e3, "steady_ms": STEADY_RESULTS["fused"][0] * 1e3}
                          if "fused" in m else None)
        fused_mod.CHUNK, fused_mod.BLOCK, fused_mod.NUM_WARPS = default
        result["fused_block_sweep_ms"] = sweep
        result["fused_breakdown"] = fused_breakdown(shapes, device)
        if not args.no_compile:
            sub = gpt_shapes(args.compile_layers, 1024, 50257)
            f = {
                "effi.Lamb(fused)": lambda ps: Lamb(ps, fused=True, lr=1e-3, weight_decay=0.01),
                "torch.compile LAMB": compiled_lamb_factory(),
                "torch.AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
            }
            t0 = time.perf_counter()
            try:
                m, _ = bench(sub, device, list(f), f, max(5, reps // 2), args.warmup)
                sub_n = sum(math.prod(s) for s in sub)
                result["compiled_vs_triton"] = {
                    "tensors": f"{args.compile_layers} layers, {sub_n} params",
                    "median_ms": {k: v * 1e3 for k, v in m.items()},
                    "x_floor": {k: v / (28 * sub_n / bw) for k, v in m.items()},
                    "wall_s_including_compile": time.perf_counter() - t0,
                }
            except Exception as e:  # noqa: BLE001 - report, do not lose the main numbers
                result["compiled_vs_triton"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(f"{label}: {n_params / 1e6:.1f}M params, copy bandwidth {bw / 1e9:.0f} GB/s, floor {floor * 1e3:.2f} ms")
    if steady:
        print("  one step after a sync (host latency included)                   | steady state, steps back to back")
    for n in names:
        line = (f"  {n:24s} {medians[n] * 1e3:9.2f} ms  {medians[n] / floor:6.2f}x floor  "
                f"{medians[n] / medians[ref]:5.2f}x AdamW(fused)")
        if n in steady:
            line += (f" | {steady[n][0] * 1e3:7.2f} ms {steady[n][0] / floor:5.2f}x floor "
                     f"{steady[n][0] / steady[ref][0]:5.2f}x AdamW(fused), host {steady[n][1] * 1e3:5.2f} ms/step")
        print(line)
    for n, why in missing.items():
        print(f"  {n:24s} skipped: {why}")
    for k in ("fused_block_sweep_ms", "fused_breakdown", "compiled_vs_triton"):
        if k in result:
            print(f"  {k}: {json.dumps(result[k])}")


if __name__ == "__main__":
    main()
