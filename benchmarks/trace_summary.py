"""Summarise a torch.profiler chrome trace of training steps (``train_throughput.py --profile``): where GPU time goes.

    python benchmarks/train_throughput.py --cases effi_fsdp_adamw_compile --steps 3 --warmup 6 --profile
    python benchmarks/trace_summary.py profiles/trace_effi_fsdp_adamw_compile.json   # .json.gz works too

Prints, over the span from the first to the last GPU activity: the wall time, the time at least one kernel / copy /
memset ran (the union over streams) and the idle rest, GPU time by kernel class (GEMM, attention, NCCL, Triton
fusions, optimizer, the rest), the largest idle gaps with the CPU op that was running when each ended, and the top
kernels by total time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

CLASSES = [  # (class, regex on the kernel name), first match wins
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|cublas|wgmma"),
    ("optimizer", r"adam|lamb|multi_tensor|foreach"),
    ("triton (compiled)", r"^triton_"),
    ("fsdp copies", r"chunk_cat|split_with_sizes|copy_in|all_gather_copy|foreach_copy"),
    ("loss / softmax", r"softmax|nll|cross_entropy|log_softmax"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other elementwise/reduce"


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps the trace covers (for per-step numbers)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not gpu:
        raise SystemExit(f"{args.trace}: no GPU kernels in this trace (a CPU run?); nothing to summarise")
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    span = end - start
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    n = args.steps
    print(f"span {span / 1e3:.1f} ms ({span / n / 1e3:.1f} ms/step), GPU busy {busy / 1e3:.1f} ms "
          f"({100 * busy / span:.1f}%), idle {(span - busy) / n / 1e3:.2f} ms/step")
    by_class: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in gpu:
        name = e["name"] if e.get("cat") == "kernel" else e.get("cat")
        by_class[classify(name) if e.get("cat") == "kernel" else name] += e["dur"]
        by_name[name][0] += e["dur"]
        by_name[name][1] += 1
    total = sum(by_class.values())
    print("\nGPU time by class (ms/step, % of the summed kernel time; streams can overlap):")
    for cls, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:28s} {t / n / 1e3:8.2f}  {100 * t / total:5.1f}%")
    # idle gaps on the union timeline
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    gaps, cur = [], spans[0][1]
    for a, b in spans[1:]:
        if a > cur:
            gaps.append((a - cur, cur, a))
        cur = max(cur, b)
    gaps.sort(reverse=True)
    print(f"\nidle gaps: {len(gaps)}; > 100 us: {sum(1 for g in gaps if g[0] > 100)} totalling "
          f"{sum(g[0] for g in gaps if g[0] > 100) / n / 1e3:.2f} ms/step; the largest:")
    for length, a, b in gaps[:12]:
        running = [o["name"] for o in cpu_ops if o["ts"] <= b <= o["ts"] + o["dur"]]
        print(f"  {length / 1e3:7.2f} ms at +{(a - start) / 1e3:8.1f} ms   cpu: {' > '.join(running[-3:])[:150]}")
    print(f"\ntop {args.top} kernels by total time (ms/step, calls/step):")
    for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {t / n / 1e3:8.2f} {c / n:6.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
