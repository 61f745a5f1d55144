"""Markdown tables and PNG plots from the committed benchmark results.

    python benchmarks/report.py                      # tables to stdout, plots to benchmarks/results/plots/
    python benchmarks/report.py --out report.md      # tables to a file (links relative to it)
    python benchmarks/report.py --plots DIR          # plots elsewhere; --no-plots for tables only

Reads the files in ``--results`` named ``<benchmark>_<hardware>_<yyyymmdd>.<ext>``:

- ``stack_overhead_*.jsonl`` (``stack_overhead.py``): tokens/s per case against its stock baseline; plots the
  relative throughput per case and peak memory against the accumulation factor;
- ``optim_step_*.json`` (``optim_step.py --out``): step times against the bandwidth floor, table and plot;
  ``optim_step_*.txt`` (its stdout, one or more runs) only where no JSON of the same hardware and date exists;
- ``train_throughput_*.jsonl`` (``train_throughput.py``): one table per run (cases that ran back to back), and a
  plot of tokens/s and MFU per case;
- ``deepspeed_memory_*.jsonl`` (``deepspeed_memory.py``): ZeRO model-state and peak memory against the ZeRO paper,
  table and plot against the stage;
- ``*.csv`` with a ``val/loss`` column (``effi fit`` CSV logs, with the run's ``.log`` beside it): validation loss.

A plot whose result file is missing is skipped with a message on stderr.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME = re.compile(r"^(?P<bench>.+?)_(?P<hw>cpu|[a-z]+\d+x\d+)_(?P<date>\d{8})\.(?P<ext>[a-z]+)$")
# Order of the sections in the report.
BENCHES = ["stack_overhead", "optim_step", "effi_fit", "train_throughput", "deepspeed_memory"]
# A new train_throughput run starts when a case began this long after the previous one ended: the driver runs
# its cases back to back, so a longer gap means a separate invocation.
RUN_GAP_S = 60
# Bytes per fp32 parameter: one read-modify-write of x, m, v plus reading g (optim_step.py's floor), and an exact
# two-pass LAMB, whose second pass reads x, m, v again and writes x once the trust ratio is known.
ADAM_BYTES, LAMB_BYTES = 28, 40


# ------------------------------------------------------------------------------------------------ discovery
class Result:
    def __init__(self, path: Path, bench: str, hw: str, date: str, ext: str) -> None:
        self.path, self.bench, self.hw, self.ext = path, bench, hw, ext
        self.date = f"{date[:4]}-{date[4:6]}-{date[6:]}"

    @property
    def stem(self) -> str:
        return self.path.stem


def discover(results: Path) -> dict[str, list[Result]]:
    """Result files by benchmark, newest date first."""
    found: dict[str, list[Result]] = defaultdict(list)
    for path in sorted(results.iterdir()):
        m = NAME.match(path.name)
        if not m or not path.is_file():
            continue
        bench, ext = m["bench"], m["ext"]
        if ext == "csv" and "val/loss" in path.read_text().split("\n", 1)[0]:
            bench = "effi_fit"
        elif (bench, ext) not in {("stack_overhead", "jsonl"), ("optim_step", "json"), ("optim_step", "txt"),
                                  ("train_throughput", "jsonl"), ("deepspeed_memory", "jsonl")}:
            continue
        found[bench].append(Result(path, m["bench"], m["hw"], m["date"], ext))
    for rs in found.values():
        rs.sort(key=lambda r: (r.date, r.hw), reverse=True)
    # Text output of optim_step only where the same run has no JSON.
    json_keys = {(r.hw, r.date) for r in found.get("optim_step", []) if r.ext == "json"}
    if "optim_step" in found:
        found["optim_step"] = [r for r in found["optim_step"] if r.ext == "json" or (r.hw, r.date) not in json_keys]
    return found


def shown(path: Path) -> Path:
    """A path as written in the report: relative to the repository when inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ markdown helpers
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def kilo(v: float) -> str:
    return f"{v / 1e3:.1f}k"


def section(result: Result, title: str, machine: str, command: str | None, link_base: Path) -> list[str]:
    rel = os.path.relpath(result.path, link_base)
    out = [f"### {title}: {result.hw}, {result.date}", "", f"- Machine: {machine}."]
    out.append(f"- Command: `{command}`" if command else "- Command: not recorded in the result file.")
    out.append(f"- Raw result: [`{shown(result.path)}`]({rel})")
    return [*out, ""]


def plot_link(png: Path | None, link_base: Path) -> list[str]:
    return [f"![{png.stem}]({os.path.relpath(png, link_base)})", ""] if png else []


# ------------------------------------------------------------------------------------------------ stack_overhead
def stack_rows(result: Result) -> dict[str, dict]:
    return {r["case"]: r for r in read_jsonl(result.path)}


def stack_relative(rows: dict[str, dict], row: dict) -> float | None:
    base = rows.get(row.get("baseline") or "")
    if not base or "error" in base:
        return None
    return 100 * (row["tokens_per_s"] / base["tokens_per_s"] - 1)


def render_stack(result: Result, link_base: Path, plots: list[Path]) -> list[str]:
    rows = stack_rows(result)
    ok = [r for r in rows.values() if "error" not in r]
    first = ok[0] if ok else {}
    machine = f"1× {first.get('gpu', '?')}, torch {first.get('torch', '?')}, lightning {first.get('lightning', '?')}"
    command = None
    if "steps" in first:
        command = (f"python benchmarks/stack_overhead.py --warmup {first['warmup']} --steps {first['steps']} "
                   f"--out {shown(result.path)}")
    out = section(result, "Plugin overhead next to stock Lightning", machine, command, link_base)
    body = []
    for name, r in rows.items():
        if "error" in r:
            body.append([f"`{name}`", *[""] * 6, r["error"][:80]])
            continue
        rel = stack_relative(rows, r)
        vs = "baseline" if rel is None else f"{rel:+.1f}% (vs `{r['baseline']}`)"
        body.append([f"`{name}`", r["precision"], r["optimizer"], "yes" if r["health"] else "", r["accumulation"],
                     kilo(r["tokens_per_s"]), vs, f"{r['peak_alloc_gib']:.2f}"])
    out += [table(["case", "precision", "optimizer", "health monitor", "accumulation", "tokens/s", "vs baseline",
                   "peak GiB"], body), ""]
    for png in plots:
        out += plot_link(png, link_base)
    return out


def plot_stack(result: Result, plot_dir: Path, plt) -> list[Path]:
    rows = stack_rows(result)
    ok = {n: r for n, r in rows.items() if "error" not in r}
    gpu = next(iter(ok.values()), {}).get("gpu", result.hw)
    pngs = []
    rel = [(n, stack_relative(ok, r)) for n, r in ok.items()]
    rel = [(n, v) for n, v in rel if v is not None]
    if rel:
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rel) + 1.4))
        names, values = [n for n, _ in rel][::-1], [v for _, v in rel][::-1]
        ax.barh(names, values, color=["tab:red" if v < 0 else "tab:green" for v in values])
        for i, v in enumerate(values):
            ax.annotate(f"{v:+.1f}%", (v, i), xytext=(3 if v >= 0 else -3, 0), textcoords="offset points",
                        ha="left" if v >= 0 else "right", va="center", fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        lim = max(1.0, max(abs(v) for v in values) * 1.35)
        ax.set_xlim(-lim, lim)
        ax.set_xlabel("tokens/s against its stock Lightning baseline (same optimizer, precision) in %")
        ax.set_title(f"Each case against stock Lightning, GPT-2-small, 1× {gpu}, {result.date}", fontsize=10)
        pngs.append(save(fig, plot_dir / f"{result.stem}_vs_stock.png", plt))
    # Same precision and optimizer, accumulation 1 vs 4 micro-batches per step, stock and AccumulationScheduler.
    series = {"stock Lightning (accumulate_grad_batches)": ("", "stock4"),
              "AccumulationScheduler": ("callback1", "callback4")}
    points = {}
    for label, kinds in series.items():
        pts = {}
        for r in ok.values():
            if (r["accumulation"] in kinds and r["precision"] == "bf16-mixed" and r["optimizer"] == "adamw"
                    and not r["health"]):
                pts.setdefault(r["micro_batches_per_step"], r)
        if pts:
            points[label] = dict(sorted(pts.items()))
    if any(len(p) > 1 for p in points.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        factors = sorted({f for p in points.values() for f in p})
        width = 0.8 / len(points)
        for i, (label, pts) in enumerate(points.items()):
            xs = [factors.index(f) + (i - (len(points) - 1) / 2) * width for f in pts]
            ys = [r["peak_alloc_gib"] for r in pts.values()]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.2f GiB", fontsize=8)
        micro = {f: r["micro_batch"] for p in points.values() for f, r in p.items()}
        ax.set_xticks(range(len(factors)), [f"{f} (micro-batch {micro[f]})" for f in factors])
        ax.set_xlabel("accumulation factor (micro-batches per optimizer step)")
        ax.set_ylabel("peak allocated GiB")
        ax.set_title(f"Peak memory against accumulation, GPT-2-small, 1× {gpu}, {result.date}", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.margins(y=0.15)
        pngs.append(save(fig, plot_dir / f"{result.stem}_accumulation_memory.png", plt))
    else:
        print(f"{result.path.name}: no accumulation cases at two factors; accumulation plot skipped", file=sys.stderr)
    return pngs


# ------------------------------------------------------------------------------------------------ optim_step
def optim_command(data: dict, result: Result) -> str | None:
    cmd = data.get("command")
    if not cmd:
        return None
    # The recorded --out is where the measuring machine wrote the file; show the committed path instead.
    cmd = re.sub(r"--out \S+", f"--out {shown(result.path)}", cmd)
    return f"python {cmd}"


def render_optim_json(result: Result, link_base: Path, plots: list[Path]) -> list[str]:
    d = json.loads(result.path.read_text())
    machine = f"{d['machine']}, torch {d['torch']}, {d['threads']} CPU threads"
    out = section(result, "Optimizer step", machine, optim_command(d, result), link_base)
    floor = d["floor_ms"]
    lamb_floor = floor * LAMB_BYTES / ADAM_BYTES
    out.append(f"- Tensors: {d['tensors']}, {d['n_params'] / 1e6:.1f}M fp32 parameters; copy bandwidth "
               f"{d['copy_bandwidth_GBps']:.0f} GB/s; floor ({ADAM_BYTES} B/parameter) {floor:.2f} ms, "
               f"exact two-pass LAMB ({LAMB_BYTES} B/parameter) {lamb_floor:.2f} ms.")
    bd = d.get("fused_breakdown")
    if bd and "step_ms" in bd:
        out.append(f"- Fused `Lamb` kernel time (`fused_breakdown.step_ms`, back to back): {bd['step_ms']:.2f} ms = "
                   f"{bd['step_ms'] / lamb_floor:.2f}× the {LAMB_BYTES} B/parameter floor.")
    if d.get("skipped"):
        out.append("- Not measured: " + "; ".join(f"`{n}`: {why}" for n, why in d["skipped"].items()) + ".")
    out.append("")
    names = list(d["median_ms"])
    if "steady_ms" in d:
        header = ["optimizer", "one step after a sync (ms)", "× floor", "back to back (ms/step)", "× floor",
                  "× AdamW(fused), back to back", "host ms/step"]
        body = [[f"`{n}`", f"{d['median_ms'][n]:.2f}", f"{d['x_floor'][n]:.2f}",
                 f"{d['steady_ms'][n]:.2f}", f"{d['steady_x_floor'][n]:.2f}",
                 f"{d['steady_x_adamw_fused'][n]:.2f}", f"{d['host_ms_per_step'][n]:.2f}"]
                for n in names if n in d["steady_ms"]]
    else:
        header = ["optimizer", "step (ms)", "× floor", "× AdamW(fused)"]
        body = [[f"`{n}`", f"{d['median_ms'][n]:.2f}", f"{d['x_floor'][n]:.2f}", f"{d['x_adamw_fused'][n]:.2f}"]
                for n in names]
    out += [table(header, body), ""]
    for png in plots:
        out += plot_link(png, link_base)
    return out


TXT_LINE = re.compile(r"^\s+(\S+)\s+([\d.]+) ms\s+([\d.]+)x floor\s+([\d.]+)x AdamW\(fused\)")


def optim_txt_runs(path: Path) -> list[dict[str, float]]:
    """The optim_step.py stdout of one or more runs: step ms per optimizer, a new run where a name repeats."""
    runs: list[dict[str, float]] = []
    for line in path.read_text().splitlines():
        m = TXT_LINE.match(line)
        if not m:
            continue
        if not runs or m[1] in runs[-1]:
            runs.append({})
        runs[-1][m[1]] = float(m[2])
    return runs


def render_optim_txt(result: Result, link_base: Path, plots: list[Path]) -> list[str]:
    runs = optim_txt_runs(result.path)
    out = section(result, "Optimizer step", result.hw, None, link_base)
    names = list(dict.fromkeys(n for r in runs for n in r))
    lamb, adamw = "effi.Lamb(default)", "torch.AdamW(fused)"
    header = ["run", *[f"`{n}` (ms)" for n in names], f"`{lamb}` / `{adamw}`"]
    body = []
    for i, r in enumerate(runs, 1):
        ratio = f"{r[lamb] / r[adamw]:.2f}" if lamb in r and adamw in r else ""
        body.append([str(i), *[f"{r[n]:.2f}" if n in r else "" for n in names], ratio])
    return [*out, table(header, body), ""]


def plot_optim(result: Result, plot_dir: Path, plt) -> list[Path]:
    if result.ext != "json":
        return []
    d = json.loads(result.path.read_text())
    names = list(d["median_ms"])[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 2.4))
    ys = range(len(names))
    h = 0.38 if "steady_ms" in d else 0.7
    label = "one step after a sync" if "steady_ms" in d else "one step"
    ax.barh([y + (h / 2 if "steady_ms" in d else 0) for y in ys], [d["median_ms"][n] for n in names], h, label=label)
    if "steady_ms" in d:
        ax.barh([y - h / 2 for y in ys], [d["steady_ms"].get(n, 0) for n in names], h, label="back to back")
    floor = d["floor_ms"]
    ax.axvline(floor, color="black", ls="--", lw=1, label=f"floor, {ADAM_BYTES} B/parameter ({floor:.2f} ms)")
    lamb_floor = floor * LAMB_BYTES / ADAM_BYTES
    ax.axvline(lamb_floor, color="gray", ls=":", lw=1.2,
               label=f"two-pass LAMB floor, {LAMB_BYTES} B/parameter ({lamb_floor:.2f} ms)")
    bd = d.get("fused_breakdown") or {}
    if "step_ms" in bd and "effi.Lamb(fused)" in names:
        ax.plot([bd["step_ms"]], [names.index("effi.Lamb(fused)")], "k*", ms=9,
                label=f"fused Lamb kernel time ({bd['step_ms']:.2f} ms)")
    ax.set_yticks(list(ys), names)
    ax.set_xscale("log")
    top = max([*d["median_ms"].values(), *d.get("steady_ms", {}).values()])
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500) if floor / 1.5 <= t <= top * 1.5]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("ms per step (log scale)")
    ax.set_title(f"Optimizer step, {d['n_params'] / 1e6:.0f}M fp32 parameters, {d['machine']}, {result.date}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return [save(fig, plot_dir / f"{result.stem}.png", plt)]


# ------------------------------------------------------------------------------------------------ train_throughput
def split_runs(rows: list[dict]) -> list[list[dict]]:
    """Rows that ran back to back, from each row's end time (``date``) and duration (``wall_s``)."""
    runs: list[list[dict]] = []
    prev_end = None
    for r in rows:
        end = datetime.datetime.fromisoformat(r["date"]) if "date" in r else None
        start = end - datetime.timedelta(seconds=r.get("wall_s", 0)) if end else None
        if not runs or (start and prev_end and (start - prev_end).total_seconds() > RUN_GAP_S):
            runs.append([])
        runs[-1].append(r)
        prev_end = end or prev_end
    return runs


def run_start(run: list[dict]) -> str:
    r = next((r for r in run if "date" in r), None)
    if not r:
        return "?"
    start = datetime.datetime.fromisoformat(r["date"]) - datetime.timedelta(seconds=r.get("wall_s", 0))
    return start.strftime("%H:%M UTC")


def throughput_runs(result: Result) -> list[list[dict]]:
    # A profiled run's timings are not measurements (train_throughput.py --profile).
    return split_runs([r for r in read_jsonl(result.path) if not r.get("profiled")])


def render_throughput(result: Result, link_base: Path, plots: list[Path]) -> list[str]:
    runs = throughput_runs(result)
    ok = [r for run in runs for r in run if "error" not in r]
    first = ok[0] if ok else {}
    machine = (f"{first.get('n_gpus', '?')}× {first.get('gpu', '?')}, torch {first.get('torch', '?')}, "
               f"lightning {first.get('lightning', '?')}")
    # One command per run, given above each run's table.
    out = [ln for ln in section(result, "Training throughput", machine, None, link_base)
           if not ln.startswith("- Command")]
    if first:
        out.insert(-1, f"- Model: GPT d_model {first['d_model']}, {first['n_layer']} layers, {first['n_head']} heads, "
                       f"block {first['block_size']}, vocab {first['vocab']}, {first['n_params'] / 1e9:.3f}B unique "
                       f"parameters; micro-batch {first['micro_batch']} per GPU, bf16-mixed.")
    for i, run in enumerate(runs, 1):
        good = [r for r in run if "error" not in r]
        ref = good[0] if good else {}
        cases = ",".join(r["strategy"] for r in run)
        cmd = (f"python benchmarks/train_throughput.py --steps {ref.get('steps', '?')} "
               f"--warmup {ref.get('warmup', '?')}"
               f" --cases {cases} --out {shown(result.path)}")
        out += [f"Run {i}, started {run_start(run)}: `{cmd}`", ""]
        body = []
        for r in run:
            if "error" in r:
                body.append([f"`{r['strategy']}`", r.get("optimizer", ""), r["error"], "", "", "", ""])
                continue
            body.append([f"`{r['strategy']}`", r["optimizer"], kilo(r["tokens_per_s"]), f"{100 * r['mfu']:.1f}%",
                         f"{100 * r['mfu_untied_count']:.1f}%", f"{r['peak_alloc_gib']:.2f}",
                         f"{r['peak_reserved_gib']:.2f}"])
        out += [table(["case", "optimizer", "tokens/s", "MFU", "MFU (untied)", "peak allocated GiB/GPU",
                       "peak reserved GiB/GPU"], body), ""]
    for png in plots:
        out += plot_link(png, link_base)
    return out


def plot_throughput(result: Result, plot_dir: Path, plt) -> list[Path]:
    runs = [[r for r in run if "error" not in r] for run in throughput_runs(result)]
    runs = [run for run in runs if run]
    if not runs:
        print(f"{result.path.name}: no successful cases; plot skipped", file=sys.stderr)
        return []
    heights = [0.32 * len(run) + 0.9 for run in runs]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for i, (run, (ax_t, ax_m)) in enumerate(zip(runs, axes)):
        labels = [f"{r['strategy']} ({r['optimizer']})" for r in run][::-1]
        ys = range(len(run))
        tps = [r["tokens_per_s"] / 1e3 for r in run][::-1]
        bars = ax_t.barh(list(ys), tps, color="tab:blue")
        ax_t.bar_label(bars, fmt="%.1fk", fontsize=7)
        ax_t.set_yticks(list(ys), labels, fontsize=8)
        ax_t.margins(x=0.15)
        ax_t.set_title(f"run {i + 1}, started {run_start(run)}: thousand tokens/s (all GPUs)", fontsize=9, loc="left")
        h = 0.4
        mfu = [100 * r["mfu"] for r in run][::-1]
        untied = [100 * r["mfu_untied_count"] for r in run][::-1]
        b1 = ax_m.barh([y + h / 2 for y in ys], mfu, h, color="tab:orange", label="MFU")
        b2 = ax_m.barh([y - h / 2 for y in ys], untied, h, color="tab:green", label="MFU (untied count)")
        ax_m.bar_label(b1, fmt="%.1f%%", fontsize=6)
        ax_m.bar_label(b2, fmt="%.1f%%", fontsize=6)
        ax_m.set_yticks(list(ys), [""] * len(run))
        ax_m.margins(x=0.15)
        ax_m.set_title("MFU per GPU (%)", fontsize=9, loc="left")
        if i == 0:
            legend = (b1, b2)
    first = runs[0][0]
    fig.suptitle(f"Training throughput, GPT {first['n_params'] / 1e9:.2f}B, {first['n_gpus']}× {first['gpu']}, "
                 f"{result.date}", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    fig.legend(legend, ["MFU", "MFU (untied count)"], loc="upper right", fontsize=8, ncol=2)
    return [save(fig, plot_dir / f"{result.stem}.png", plt, layout=False)]


# ------------------------------------------------------------------------------------------------ deepspeed_memory
def render_deepspeed(result: Result, link_base: Path, plots: list[Path]) -> list[str]:
    rows = read_jsonl(result.path)
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    world = first.get("world_size", "?")
    machine = f"{world}× {first.get('device', '?')}, torch {first.get('torch', '?')}"
    steps = "".join(f" --{k} {first[k]}" for k in ("steps", "warmup") if k in first)
    command = (f"python -m torch.distributed.run --standalone --nproc_per_node={world} benchmarks/deepspeed_memory.py "
               f"--case <case>{steps} --out {shown(result.path)}")
    out = section(result, "ZeRO memory", machine, command, link_base)
    if first:
        out.insert(-1, f"- Model: GPT, {first['params'] / 1e9:.3f}B parameters, micro-batch {first['micro_batch']} × "
                       f"{first['seq_len']} tokens per GPU, bf16-mixed.")
    body = []
    for r in rows:
        if "error" in r:
            body.append([f"`{r['case']}`", r["error"][:80], "", "", "", ""])
            continue
        body.append([f"`{r['case']}`", f"{r['model_state_gib']:.2f}", f"{r['model_state_bytes_per_param']:.2f}",
                     f"{r['paper_bytes_per_param']:.1f}", f"{r['peak_gib']:.2f}", kilo(r["tokens_per_s"])])
    out += [table(["case", "model state GiB/GPU", "bytes/param, measured", "bytes/param, ZeRO paper",
                   "peak GiB/GPU", "tokens/s"], body), ""]
    for png in plots:
        out += plot_link(png, link_base)
    return out


def plot_deepspeed(result: Result, plot_dir: Path, plt) -> list[Path]:
    rows = [r for r in read_jsonl(result.path) if "error" not in r]
    if not rows:
        print(f"{result.path.name}: no successful cases; plot skipped", file=sys.stderr)
        return []
    rows.sort(key=lambda r: (int(r["case"].split(":")[1]), r["case"].split(":")[0] != "effi"))
    labels = [f"{'effi' if r['case'].startswith('effi') else 'stock'} ZeRO-{r['case'].split(':')[1]}\n"
              f"({r['case'].split(':')[2]})" for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.27
    series = [("model state, measured", "model_state_gib", "tab:blue"),
              ("model state, ZeRO paper", "paper_gib", "tab:gray"),
              ("peak allocated", "peak_gib", "tab:orange")]
    for j, (label, key, color) in enumerate(series):
        bars = ax.bar([i + (j - 1) * width for i in range(len(rows))], [r[key] for r in rows], width, label=label,
                      color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("ZeRO stage")
    ax.set_ylabel("GiB per GPU")
    ax.set_ylim(0, 1.3 * max(r[k] for r in rows for _, k, _ in series))
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    first = rows[0]
    ax.set_title(f"Memory against ZeRO stage, GPT {first['params'] / 1e9:.2f}B, {first['world_size']}× "
                 f"{first['device']}, {result.date}", fontsize=10)
    return [save(fig, plot_dir / f"{result.stem}.png", plt)]


# ------------------------------------------------------------------------------------------------ effi fit (CSV)
def fit_summary(result: Result) -> dict:
    val: dict[int, float] = {}
    last_step = 0
    with result.path.open() as f:
        for row in csv.DictReader(f):
            last_step = max(last_step, int(row["step"]))
            if row.get("val/loss"):
                step, loss = int(row["step"]) + 1, float(row["val/loss"])
                # The end of fit logs the last validation a second time, one step later.
                if not (val and step == max(val) + 1 and loss == val[max(val)]):
                    val.setdefault(step, loss)
    log = result.path.with_suffix(".log")
    text = log.read_text() if log.exists() else ""

    def grab(pattern: str) -> str:
        m = re.search(pattern, text)
        return m[1].strip() if m else ""

    command = grab(r'Command being timed: "([^"]+)"').replace(f"{REPO}/", "")
    command = re.sub(r"\S*/(configs/\S+)", r"\1", command)
    return {"val": val, "steps": last_step, "entropy": grab(r"unigram entropy ([\d.]+) nats/token"),
            "wall": grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*(\S+)"),
            "cpu": grab(r"Percent of CPU[^:]*:\s*(\S+)"),
            "command": command, "log": log if log.exists() else None}


def render_fit(results: list[Result], link_base: Path) -> list[str]:
    out: list[str] = []
    for (hw, date), group in group_by(results, lambda r: (r.hw, r.date)).items():
        out += [f"### `effi fit` on the example configs: {hw}, {date}", ""]
        body = []
        for r in group:
            s = fit_summary(r)
            vals = s["val"]
            final = vals[max(vals)] if vals else float("nan")
            raw = [f"[`{r.path.name}`]({os.path.relpath(r.path, link_base)})"]
            if s["log"]:
                raw.append(f"[`{s['log'].name}`]({os.path.relpath(s['log'], link_base)})")
            body.append([f"`{s['command'] or r.bench}`", str(s["steps"]),
                         " / ".join(f"{v:.3f} @ {k}" for k, v in sorted(vals.items())), f"{final:.3f}",
                         s["entropy"], f"{s['wall']} ({s['cpu']} CPU)" if s["wall"] else "", ", ".join(raw)])
        out += [table(["command", "optimizer steps", "val loss @ step (nats/token)", "final val loss",
                       "unigram entropy of the corpus", "wall time", "raw result"], body), ""]
    return out


# ------------------------------------------------------------------------------------------------ driver
def group_by(items, key) -> dict:
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def save(fig, path: Path, plt, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RENDER = {"stack_overhead": render_stack, "train_throughput": render_throughput, "deepspeed_memory": render_deepspeed}
PLOT = {"stack_overhead": plot_stack, "optim_step": plot_optim, "train_throughput": plot_throughput,
        "deepspeed_memory": plot_deepspeed}
TITLES = {"stack_overhead": "Plugin overhead (`stack_overhead.py`)", "optim_step": "Optimizer step (`optim_step.py`)",
          "effi_fit": "Example training runs (`effi fit`)", "train_throughput": "Training throughput "
          "(`train_throughput.py`)", "deepspeed_memory": "ZeRO memory (`deepspeed_memory.py`)"}
PLOTTED = {"stack_overhead": "plugin overhead and accumulation memory", "optim_step": "optimizer step time",
           "train_throughput": "tokens/s and MFU", "deepspeed_memory": "memory against ZeRO stage"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="directory of result files")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here instead of stdout")
    p.add_argument("--plots", type=Path, default=HERE / "results" / "plots", help="directory for the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    args = p.parse_args()
    args.results = args.results.resolve()
    found = discover(args.results)
    link_base = args.out.resolve().parent if args.out else REPO
    plt = None
    if not args.no_plots:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    lines = ["# Benchmark results", "", f"Generated by `python benchmarks/report.py` from `{shown(args.results)}`.", ""]
    for bench in BENCHES:
        results = found.get(bench, [])
        if plt is not None and bench in PLOT and not any(r.ext != "txt" for r in results):
            kind = "JSON" if bench == "optim_step" else "JSON-lines"
            print(f"no {bench} {kind} result file in {shown(args.results)}: {PLOTTED[bench]} plot skipped",
                  file=sys.stderr)
        if not results:
            continue
        lines += [f"## {TITLES[bench]}", ""]
        if bench == "effi_fit":
            lines += render_fit(results, link_base)
            continue
        for r in results:
            pngs = PLOT[bench](r, args.plots.resolve(), plt) if plt is not None else []
            for png in pngs:
                print(f"wrote {png}", file=sys.stderr)
            if bench == "optim_step":
                lines += (render_optim_json if r.ext == "json" else render_optim_txt)(r, link_base, pngs)
            else:
                lines += RENDER[bench](r, link_base, pngs)
    text = "\n".join(lines).rstrip() + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
