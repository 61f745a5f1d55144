"""What each lightning_effi plugin costs next to stock Lightning, all cases in one process on one GPU.

    python benchmarks/stack_overhead.py --out benchmarks/results/stack_overhead_<hardware>_<yyyymmdd>.jsonl
    python benchmarks/stack_overhead.py --cases stock_bf16,lsp_bf16 --steps 25      # a subset
    python benchmarks/stack_overhead.py --accelerator cpu --no-compile --d-model 128 --n-layer 4 --n-head 4 \
        --block-size 128 --vocab 512 --micro-batch 8 --warmup 3 --steps 20 --cases stock_bf16,health_only,...

Workload: the example ``GPTLightningModule`` at GPT-2-small shape (12 layers, d=768, 12 heads, vocab 50304, block
1024), micro-batch 16, ``compile=True``, fused AdamW (lr 3e-4) unless the case says Lamb, random tokens, no logger,
no progress bar, no checkpointing. Each case runs ``--warmup + --steps`` optimizer steps; the last ``--steps`` are
timed (synchronised before and after). The stock bf16 case runs first and last, so drift within the run shows. The
two accumulation cases run at micro-batch 4 with 4 micro-batches per step (Lightning's ``accumulate_grad_batches=4``
against ``AccumulationScheduler({0: 4})``) and also report peak memory. Output: one JSON line per case, then a table
with tokens/s and the ratio to stock Lightning with the same optimizer and precision.

``--isolate`` runs each case in a fresh process (host-bound cases, such as the accumulation pair, run slower the later
they come in one process; name a case more than once, in the order A,B,B,A, and the table compares the means of
its runs); ``--share-model`` runs the cases in one process on one model compiled once, in turns;
``--kernel-profile A:B`` adds GPU time by kernel over warm-up steps A to B, ``--host-profile A:B`` host time by
Python function (cProfile); each row also reports the garbage collector's pauses in the timed steps.

``--accelerator cpu`` runs the same cases on the CPU (at a small shape, see above); there only the ratios mean
anything, and peak memory is not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclasses.dataclass(frozen=True)
class Case:
    precision: str = "bf16-mixed"  # Trainer(precision=...), or "lsp-16"/"lsp-bf16"/"master-fp32" for our plugins
    optimizer: str = "adamw"
    health: bool = False
    nonfinite: str | None = "raise"  # TrainingHealthMonitor(on_nonfinite=...) when health is on
    # "", "callback1" ({0: 1}), "callback4" ({0: 4}), "stock4" (accumulate_grad_batches=4), "automb1"/"automb4"
    # (AutoMicroBatch with out-of-memory recovery armed, the size given: no probe)
    accumulation: str = ""
    baseline: str = ""  # the case this one is compared with


CASES = {
    "stock_bf16": Case(),
    "health_only": Case(health=True, baseline="stock_bf16"),
    "health_nocheck": Case(health=True, nonfinite=None, baseline="stock_bf16"),
    "accum_only": Case(accumulation="callback1", baseline="stock_bf16"),
    "lsp_bf16": Case(precision="lsp-bf16", baseline="stock_bf16"),
    "stock_16": Case(precision="16-mixed"),
    "lsp_16": Case(precision="lsp-16", baseline="stock_16"),
    "stack_bf16_adamw": Case(precision="lsp-bf16", health=True, accumulation="callback1", baseline="stock_bf16"),
    "stack_16_adamw": Case(precision="lsp-16", health=True, accumulation="callback1", baseline="stock_16"),
    "stock_bf16_lamb": Case(optimizer="lamb"),
    "health_bf16_lamb": Case(optimizer="lamb", health=True, baseline="stock_bf16_lamb"),
    "stack_bf16_lamb": Case(precision="lsp-bf16", optimizer="lamb", health=True, accumulation="callback1",
                            baseline="stock_bf16_lamb"),
    "stock_16_lamb": Case(precision="16-mixed", optimizer="lamb"),
    "stack_16_lamb": Case(precision="lsp-16", optimizer="lamb", health=True, accumulation="callback1",
                          baseline="stock_16_lamb"),
    "master_fp32_lamb": Case(precision="master-fp32", optimizer="lamb", baseline="stock_bf16_lamb"),
    "stock_accum4": Case(accumulation="stock4"),
    "callback_accum4": Case(accumulation="callback4", baseline="stock_accum4"),
    "automb_armed": Case(accumulation="automb1", baseline="stock_bf16"),
    "automb_armed4": Case(accumulation="automb4", baseline="stock_accum4"),
    "stock_bf16_again": Case(baseline="stock_bf16"),
}


def run_case(name: str, args, shared: dict | None = None) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    from lightning_effi.callbacks import AccumulationScheduler, AutoMicroBatch, TrainingHealthMonitor
    from lightning_effi.models import GPTLightningModule
    from lightning_effi.optim import Lamb
    from lightning_effi.plugins import LossScalingPrecision, MasterWeightsPrecision

    case = CASES[name]
    if shared is None:
        # Every case compiles a new module: without a reset, the compiled code of the earlier cases stays cached on
        # the same function and each call of a later case checks their guards first, which slows the later cases.
        torch._dynamo.reset()
    accum4 = case.accumulation.endswith("4")
    micro = 4 if accum4 else args.micro_batch
    per_step = 4 if accum4 else 1

    class RandomTokens(Dataset):
        def __len__(self) -> int:
            return (args.warmup + args.steps + 2) * micro * per_step

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            t = torch.randint(0, args.vocab, (args.block_size + 1,), generator=g)
            return {"input_ids": t[:-1], "labels": t[1:]}

    gpu = args.accelerator == "gpu"

    class Timer(pl.Callback):
        t0 = t1 = None

        def __init__(self) -> None:
            # One CUDA event per timed optimizer step (recorded without a sync, read after the run): the device's
            # time per step, so a few slow steps (a logging step, a stall) show apart from a steady cost.
            self.events: list = []
            self.event_steps: list[int] = []
            self.host: list[float] = []  # host clock at the same points (the only per-step time on a CPU)
            # The cyclic garbage collector's pauses in the timed steps, by generation: where the host sets the pace,
            # a case that allocates more Python objects per step pays for collections of the whole heap too.
            self.gc_s, self.gc_runs, self._gc_t = 0.0, [0, 0, 0], 0.0

        def _gc(self, phase: str, info: dict) -> None:
            if phase == "start":
                self._gc_t = time.perf_counter()
            else:
                self.gc_s += time.perf_counter() - self._gc_t
                self.gc_runs[info["generation"]] += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup and self.t0 is None:
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                gc.callbacks.append(self._gc)
                self.t0 = time.perf_counter()
            if self.t0 is not None and self.t1 is None and trainer.global_step not in self.event_steps[-1:]:
                self.host.append(time.perf_counter())
                self.event_steps.append(trainer.global_step)
                if gpu:
                    self.events.append(torch.cuda.Event(enable_timing=True))
                    self.events[-1].record()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup + args.steps and self.t1 is None:
                self.event_steps.append(trainer.global_step)
                if gpu:
                    self.events.append(torch.cuda.Event(enable_timing=True))
                    self.events[-1].record()
                    torch.cuda.synchronize()
                self.t1 = time.perf_counter()
                gc.callbacks.remove(self._gc)
                self.host.append(self.t1)

        def series(self) -> dict[str, list[float]]:
            series = {"host": [1e3 * (b - a) for a, b in zip(self.host, self.host[1:])]}
            if gpu:
                series["gpu"] = [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
            return series

        def per_step(self) -> dict:
            out: dict[str, Any] = {"gc_ms_per_step": round(1e3 * self.gc_s / args.steps, 3),
                                   "gc_collections_by_generation": self.gc_runs}
            series = self.series()
            for kind, ms in series.items():
                if ms:
                    order = sorted(range(len(ms)), key=ms.__getitem__, reverse=True)
                    out.update({f"{kind}_step_ms_median": round(statistics.median(ms), 3),
                                f"{kind}_step_ms_mean": round(statistics.fmean(ms), 3),
                                f"{kind}_slowest_steps": [[self.event_steps[i], round(ms[i], 2)] for i in order[:5]]})
            return out

    class KernelProfile(pl.Callback):
        """GPU time by kernel over optimizer steps [A, B) of the untimed warm-up (torch.profiler, CUDA only):
        where two cases differ in device work, apart from host time and the GPU clock."""

        def __init__(self, a: int, b: int) -> None:
            self.a, self.b, self.done = a, b, False
            self.prof: Any = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.a and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self.b and self.prof is not None and not self.done:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                self.done = True

        def summary(self) -> dict:
            if not self.done:
                return {}
            n = self.b - self.a
            ev = sorted(self.prof.key_averages(), key=lambda e: -e.self_device_time_total)
            return {"kernel_ms_per_step": round(sum(e.self_device_time_total for e in ev) / n / 1e3, 3),
                    "top_kernels": [[e.key[:120], round(e.self_device_time_total / n / 1e3, 3), round(e.count / n, 1)]
                                    for e in ev[:25]]}

    class HostProfile(pl.Callback):
        """Host time by Python function over optimizer steps [A, B) of the untimed warm-up (cProfile): where two cases
        that the host paces differ, which functions they spend it in. The profiler slows every call alike, so the
        totals are inflated; the differences between cases are what it is for."""

        def __init__(self, a: int, b: int) -> None:
            import cProfile

            self.a, self.b, self.done, self.on = a, b, False, False
            self.prof = cProfile.Profile()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.a and not (self.on or self.done):
                self.on = True
                self.prof.enable()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self.b and self.on:
                self.prof.disable()
                self.on, self.done = False, True

        def summary(self) -> dict:
            import pstats

            if not self.done:
                return {}
            n = self.b - self.a
            stats = pstats.Stats(self.prof).stats  # type: ignore[attr-defined]
            rows = sorted(stats.items(), key=lambda kv: -kv[1][2])

            def label(key) -> str:
                file, line, fn = key
                return f"{Path(file).name}:{line}:{fn}" if file != "~" else fn

            # Per lightning_effi source file: the cumulative time of the calls into it from other files, less that
            # of its direct calls into another of the package's files (a wrapped training_step is then the wrapper's
            # cost, not the model's). A re-entry through another package's frames counts again (a module's forward
            # through nn.Module.__call__, a precision plugin's closure): compare one file between cases, don't add.
            def rel(file: str) -> str | None:
                return file.split("lightning_effi", 1)[1].lstrip("/\\") if "lightning_effi" in file else None

            inside: dict[str, float] = {}
            for (file, _, _), (_, _, _, _, callers) in stats.items():
                f = rel(file)
                if f is None:
                    continue
                for (caller_file, _, _), c in callers.items():
                    g = rel(caller_file)
                    if g == f:
                        continue
                    inside[f] = inside.get(f, 0.0) + c[3]
                    if g is not None:
                        inside[g] = inside.get(g, 0.0) - c[3]
            return {
                "host_profile_ms_per_step": round(1e3 * sum(v[2] for v in stats.values()) / n, 3),
                "host_calls_per_step": round(sum(v[1] for v in stats.values()) / n, 1),
                "host_effi_ms_per_step": round(1e3 * sum(v[2] for k, v in stats.items()
                                                         if "lightning_effi" in k[0]) / n, 3),
                "host_effi_entry_ms_per_step_by_file": {
                    f: round(1e3 * t / n, 3) for f, t in sorted(inside.items(), key=lambda kv: -kv[1]) if t > 0},
                "host_top": [[label(k)[:120], round(1e3 * v[2] / n, 3), round(v[1] / n, 1)] for k, v in rows[:30]],
            }

    class Interleave(pl.Callback):
        """The case's own callbacks (and the training_step wrapper they install) taken out of the loop at every other
        optimizer step: the steps without them are stock Lightning, in the same fit, so the pair of neighbouring steps
        compares the two under the same host, clocks and allocator state. Lightning re-reads ``trainer.callbacks`` at
        every hook, so a new list at a step boundary switches them."""

        def __init__(self, toggled: list) -> None:
            self.toggled, self.on, self.step = toggled, True, 0
            self.active: dict[int, bool] = {0: True}
            self.full: list | None = None
            self.wrapper: Any = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self.step:
                return  # inside an accumulation window
            self.step = trainer.global_step
            if self.full is None:
                self.full = list(trainer.callbacks)
            self.on = not self.on
            if self.on:
                trainer.callbacks = list(self.full)
                if self.wrapper is not None:
                    pl_module.training_step = self.wrapper
            else:
                trainer.callbacks = [c for c in self.full if all(c is not t for t in self.toggled)]
                self.wrapper = vars(pl_module).pop("training_step", None)
            self.active[self.step] = self.on

        def summary(self, steps: list[int], ms: list[float]) -> dict:
            # Each step with the callbacks against the mean of its two neighbours without them.
            flags = [self.active.get(st, True) for st in steps]
            ratios = [ms[i] / (0.5 * (ms[i - 1] + ms[i + 1])) - 1 for i in range(1, len(ms) - 1)
                      if flags[i] and not flags[i - 1] and not flags[i + 1]]
            if len(ratios) < 3:
                return {}
            mean, sd = statistics.fmean(ratios), statistics.stdev(ratios)
            half = 1.96 * sd / len(ratios) ** 0.5
            on = [t for t, f in zip(ms, flags) if f]
            off = [t for t, f in zip(ms, flags) if not f]
            return {"interleave_pairs": len(ratios),
                    "interleave_cost_pct_mean": round(100 * mean, 2),
                    "interleave_cost_pct_ci95": [round(100 * (mean - half), 2), round(100 * (mean + half), 2)],
                    "interleave_cost_pct_median": round(100 * statistics.median(ratios), 2),
                    "interleave_step_ms_with": round(statistics.fmean(on), 3),
                    "interleave_step_ms_without": round(statistics.fmean(off), 3)}

    def optimizer(groups):
        if case.optimizer == "lamb":
            return Lamb(groups, lr=3e-4, betas=(0.9, 0.999), eps=1e-6)
        return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)  # CPU kernel too

    plugins: list[Any] = []
    precision: Any = case.precision
    if case.precision.startswith("lsp-"):
        plugins, precision = [LossScalingPrecision("16-mixed" if case.precision == "lsp-16" else "bf16-mixed")], None
    elif case.precision == "master-fp32":
        plugins, precision = [MasterWeightsPrecision("fp32")], None
    callbacks: list = [Timer()]
    if case.health:
        callbacks.append(TrainingHealthMonitor(log_every_n_steps=50, on_nonfinite=case.nonfinite))  # type: ignore[arg-type]
    if case.accumulation.startswith("callback"):
        callbacks.append(AccumulationScheduler({0: per_step}, unit="step"))
    if case.accumulation.startswith("automb"):
        class Given(AutoMicroBatch):
            @staticmethod
            def _can_probe(trainer) -> bool:  # the loader is given here; the probe builds its own
                return False

        callbacks.append(Given(micro * per_step, max_micro_batch_size=micro, on_oom="split"))
    timer = callbacks[0]
    interleave = Interleave(callbacks[1:]) if getattr(args, "interleave", False) else None
    profiles: list = []
    if getattr(args, "kernel_profile", None):
        profiles.append(KernelProfile(*args.kernel_profile))
    if getattr(args, "host_profile", None):
        profiles.append(HostProfile(*args.host_profile))
    callbacks += profiles
    if interleave is not None:
        callbacks.append(interleave)  # last: the toggled callbacks end their step before it switches them
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=precision, plugins=plugins, callbacks=callbacks,
        max_steps=args.warmup + args.steps, accumulate_grad_batches=4 if case.accumulation == "stock4" else 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    model = None if shared is None else shared.get("model")
    if model is None:
        model = GPTLightningModule(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer,
                                   n_head=args.n_head, d_model=args.d_model, optimizer=optimizer, warmup_steps=10,
                                   max_steps=args.warmup + args.steps, compile=args.compile)
        if shared is not None:
            shared["model"] = model
    model.batch_size = micro  # the attribute AutoMicroBatch sets
    workers = (2 if gpu else 0) if args.loader_workers is None else args.loader_workers
    loader = DataLoader(RandomTokens(), batch_size=micro, num_workers=workers, pin_memory=gpu, shuffle=False)
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:  # a fit that failed midway leaves no collector hook or profiler running into the next case
        if timer._gc in gc.callbacks:
            gc.callbacks.remove(timer._gc)
        for prof in profiles:
            if getattr(prof, "on", False):
                prof.prof.disable()
    seconds = timer.t1 - timer.t0
    tokens = args.steps * micro * per_step * args.block_size
    row = {
        "bench": "stack_overhead", "case": name, **dataclasses.asdict(case), "micro_batch": micro,
        "micro_batches_per_step": per_step, "steps": args.steps, "warmup": args.warmup, "loader_workers": workers,
        "tokens_per_s": round(tokens / seconds, 1),
        "step_ms": round(1e3 * seconds / args.steps, 3),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if gpu else None,
        **timer.per_step(), **{k: v for prof in profiles for k, v in prof.summary().items()},
        **({} if interleave is None else
           {"interleave": True, **interleave.summary(timer.event_steps, timer.series()["gpu" if gpu else "host"])}),
        "gpu": torch.cuda.get_device_name() if gpu else None, "cpu_threads": torch.get_num_threads(),
        "compile": args.compile, "shared_model": shared is not None,
        # Graphs compiled so far in this process: on a shared model a later case that adds some recompiled it.
        "dynamo_unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "torch": torch.__version__, "lightning": pl.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    del trainer, model, loader
    gc.collect()  # the case's objects, cycles included, gone: later cases pay no collector time for them
    if gpu:
        torch.cuda.empty_cache()
    return row


def run_isolated(name: str, args) -> dict:
    """``name`` in a fresh Python process: nothing of the earlier cases (compiled code, allocator and interpreter
    state) is left to slow a later one, which shows most where the host bounds the step."""
    import subprocess

    argv = [sys.executable, __file__, "--cases", name, "--d-model", str(args.d_model), "--n-layer", str(args.n_layer),
            "--n-head", str(args.n_head), "--block-size", str(args.block_size), "--vocab", str(args.vocab),
            "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--accelerator", args.accelerator, "--compile" if args.compile else "--no-compile"]
    if args.loader_workers is not None:
        argv += ["--loader-workers", str(args.loader_workers)]
    if args.interleave:
        argv.append("--interleave")
    for flag, steps in (("--kernel-profile", args.kernel_profile), ("--host-profile", args.host_profile)):
        if steps:
            argv += [flag, "{}:{}".format(*steps)]
    done = subprocess.run(argv, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith('{"bench"'):
            return json.loads(line)
    raise RuntimeError(f"the process for case {name} exited {done.returncode} without a result: "
                       f"{(done.stderr or done.stdout)[-400:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=15, help="untimed optimizer steps first (compilation)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="the example model's torch.compile (--no-compile on a CPU: compiling there takes minutes)")
    p.add_argument("--isolate", action="store_true",
                   help="run each case in a fresh process (for host-bound cases, which earlier cases slow down)")
    p.add_argument("--share-model", action="store_true",
                   help="one model, compiled once, for every case in one process (cases with the same optimizer); "
                        "name the pair in turns, A,B,B,A,..., so that slow drift of the host falls on both alike")
    p.add_argument("--loader-workers", type=int, default=None, metavar="N",
                   help="DataLoader worker processes (default 2 on a GPU, 0 on a CPU); 0 takes the workers and their "
                        "queue out of a host-bound step")
    p.add_argument("--interleave", action="store_true",
                   help="one fit per case with its callbacks switched off at every other optimizer step: each step "
                        "with them against its neighbours without them (stock Lightning), in the same fit")
    p.add_argument("--kernel-profile", default=None, metavar="A:B",
                   help="also report GPU time by kernel over optimizer steps A to B of the warm-up (CUDA)")
    p.add_argument("--host-profile", default=None, metavar="A:B",
                   help="also report host time by Python function (cProfile) over optimizer steps A to B of the "
                        "warm-up")
    args = p.parse_args()
    for flag in ("kernel_profile", "host_profile"):
        given = getattr(args, flag)
        if given is None:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            a, b = (int(x) for x in given.split(":"))
        except ValueError:
            p.error(f"{name} {given!r}: give two step numbers A:B, e.g. 30:40")
        if not 0 <= a < b <= args.warmup or (flag == "kernel_profile" and args.accelerator != "gpu"):
            p.error(f"{name} {given!r}: needs 0 <= A < B <= --warmup ({args.warmup}), so that the profiler stays "
                    "out of the timed steps" + (", and a GPU" if flag == "kernel_profile" else ""))
        setattr(args, flag, (a, b))
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.interleave:
        bad = [c for c in cases if not (CASES[c].baseline and CASES[c].precision == CASES[CASES[c].baseline].precision
                                        and (CASES[c].health or CASES[c].accumulation.startswith("callback")))]
        if bad:
            p.error(f"--interleave switches a case's callbacks off and on within one fit; {bad} differ from their "
                    "baseline in more than callbacks (choose from the accumulation and health cases)")
    if args.share_model and (args.isolate or len({CASES[c].optimizer for c in cases}) > 1):
        p.error("--share-model runs every case on one model in one process: not with --isolate, and only for cases "
                f"with the same optimizer (got {sorted({CASES[c].optimizer for c in cases})})")
    import torch

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        sys.exit("stack_overhead.py measures GPU throughput; no CUDA device is visible (--accelerator cpu for ratios)")
    import torch._dynamo

    torch.backends.cuda.matmul.allow_tf32 = True
    rows: list[tuple[str, dict]] = []
    shared: dict | None = {} if args.share_model else None
    for name in cases:
        try:
            row = run_isolated(name, args) if args.isolate else run_case(name, args, shared)
        except Exception as e:  # noqa: BLE001 - report and go on: the other cases still measure
            row = {"bench": "stack_overhead", "case": name, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append((name, row))
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    # A case named more than once (A,B,B,A orders against drift) is compared by the mean over its runs: each run
    # against the mean of the baseline's runs, then the mean of the case's runs on its own line.
    speed: dict[str, list[float]] = {}
    for name, row in rows:
        if "error" not in row:
            speed.setdefault(name, []).append(row["tokens_per_s"])

    def vs_baseline(row: dict, tokens_per_s: float) -> str:
        base = speed.get(row["baseline"]) if row["baseline"] else None
        return f"{100 * (tokens_per_s / statistics.fmean(base) - 1):+.1f}%" if base else ""

    print(f"\n{'case':28s} {'tokens/s':>11s} {'vs baseline':>12s} {'peak GiB':>9s}")
    for name, row in rows:
        if "error" in row:
            print(f"{name:28s} {row['error']}")
            continue
        peak = "" if row["peak_alloc_gib"] is None else f"{row['peak_alloc_gib']:9.2f}"
        print(f"{name:28s} {row['tokens_per_s']:11.1f} {vs_baseline(row, row['tokens_per_s']):>12s} {peak:>9s}")
        if "interleave_cost_pct_mean" in row:
            lo, hi = row["interleave_cost_pct_ci95"]
            print(f"{'':28s} steps with its callbacks {row['interleave_cost_pct_mean']:+.2f}% longer than their "
                  f"neighbours without (95% CI {lo:+.2f}..{hi:+.2f}%, "
                  f"median {row['interleave_cost_pct_median']:+.2f}%, {row['interleave_pairs']} steps)")
    for name, runs in speed.items():
        if len(runs) > 1:
            row = next(r for n, r in rows if n == name and "error" not in r)
            label = f"{name} (mean of {len(runs)})"
            print(f"{label:28s} {statistics.fmean(runs):11.1f} {vs_baseline(row, statistics.fmean(runs)):>12s}")


if __name__ == "__main__":
    main()
