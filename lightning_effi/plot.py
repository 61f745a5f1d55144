"""A PNG of a training run's logged metrics: ``effi plot RUN_DIR [--out FILE]``.

Reads the run's TensorBoard event files (``events.out.tfevents.*``) or, when there are none, its Lightning CSVLogger
``metrics.csv`` files, searched for anywhere under ``RUN_DIR``; each directory of event files, and each CSV file, is
one run (several runs are drawn over each other, labelled by their path under ``RUN_DIR``). One panel per kind of
metric found, in this order:

======================  =================================================================================
panel                   logged names (who logs them)
======================  =================================================================================
loss                    ``train/loss``, ``val/loss`` (``GPTLightningModule``, ``BertMLMLightningModule``)
learning rate           ``lr-*``: Lightning's ``LearningRateMonitor`` (``lr-AdamW``, ``lr-AdamW/pg1``, ...;
                        its ``-momentum`` and ``-weight_decay`` entries are left out)
gradient norm           ``health/grad_norm`` (``TrainingHealthMonitor``)
loss scale              ``health/loss_scale`` (``TrainingHealthMonitor`` with ``LossScalingPrecision`` or
                        DeepSpeed fp16)
skipped steps           ``health/skipped_steps``, the count so far (``TrainingHealthMonitor``)
accumulation factor     ``accumulation/factor`` (``AccumulationScheduler``)
tokens/s                ``health/tokens_per_sec`` (``TrainingHealthMonitor``, summed over ranks)
======================  =================================================================================

``TrainingHealthMonitor``'s names are matched by their ending, whatever its ``prefix``. A panel is drawn only when
one of its names was logged. Only the standard library, matplotlib and TensorBoard's event reader are imported
here, so the command starts without loading torch.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

__all__ = ["Panel", "main", "panels", "plot_run", "read_runs"]

EVENTS_GLOB = "events.out.tfevents.*"
CSV_NAME = "metrics.csv"
PNG_NAME = "metrics.png"

# (step, value) pairs of one metric, in logged order
Series = list[tuple[int, float]]


class Panel(NamedTuple):
    """One panel of the figure: its title and the logged metric names drawn in it."""

    title: str
    metrics: tuple[str, ...]


class _Spec(NamedTuple):
    title: str
    pattern: re.Pattern[str]
    shown: str  # the names, for messages
    log_base: int | None = None  # a log y axis, when every value is positive
    steps: bool = False  # a value that changes at a step and holds: drawn as a staircase
    integer: bool = False  # integer ticks from 0 (an all-zero count would otherwise get ticks between -0.04 and 0.04)
    eng: bool = False  # large values: 12k rather than 12000


_SPECS = (
    _Spec("loss", re.compile(r"(train|val)/loss"), "train/loss, val/loss"),
    _Spec("learning rate", re.compile(r"lr-.+(?<!-momentum)(?<!-weight_decay)"), "lr-*"),
    _Spec("gradient norm", re.compile(r".*grad_norm"), "*grad_norm"),
    _Spec("loss scale", re.compile(r".*loss_scale"), "*loss_scale", log_base=2, steps=True),
    _Spec("skipped steps (cumulative)", re.compile(r".*skipped_steps"), "*skipped_steps", steps=True, integer=True),
    _Spec("accumulation factor", re.compile(r"accumulation/factor"), "accumulation/factor", steps=True, integer=True),
    _Spec("tokens/s", re.compile(r".*tokens_per_sec"), "*tokens_per_sec", eng=True),
)


def panels(names: list[str] | set[str] | tuple[str, ...]) -> list[Panel]:
    """The panels :func:`plot_run` draws for a run that logged ``names``, in drawing order (empty when none fit)."""
    out = []
    for spec in _SPECS:
        matched = tuple(sorted(n for n in names if spec.pattern.fullmatch(n)))
        if matched:
            out.append(Panel(spec.title, matched))
    return out


def read_runs(run_dir: str | Path) -> dict[str, dict[str, Series]]:
    """Every run's scalar metrics under ``run_dir``: ``{run label: {metric name: [(step, value), ...]}}``.

    A run is a directory holding TensorBoard event files, or, when ``run_dir`` holds no event file at all, a CSVLogger
    ``metrics.csv`` (TensorBoard first: a Trainer with both loggers writes the same values twice). The label is the
    run's path relative to ``run_dir`` (``"."`` for ``run_dir`` itself).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds neither kind of file.
        ValueError: a ``metrics.csv`` without a ``step`` column (not written by CSVLogger).
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Run directory {str(root)!r} does not exist (or is not a directory); pass the "
                                "logger's save_dir or a run's version directory")
    event_dirs = sorted({p.parent for p in root.rglob(EVENTS_GLOB) if p.is_file()})
    if event_dirs:
        return {_label(d, root): _read_events(d) for d in event_dirs}
    csvs = sorted(p for p in root.rglob(CSV_NAME) if p.is_file())
    if csvs:
        return {_label(p.parent, root): _read_csv(p) for p in csvs}
    raise FileNotFoundError(
        f"No logged metrics under {str(root)!r}: looked for TensorBoard event files ({EVENTS_GLOB}) and CSVLogger "
        f"{CSV_NAME} files in it and its subdirectories. Pass the logger's save_dir or the run's version directory."
    )


def _label(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _read_events(directory: Path) -> dict[str, Series]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    # 0 keeps every scalar (the default samples 10,000 per tag); the other kinds are not drawn: keep one of each.
    acc = ea.EventAccumulator(str(directory), size_guidance={ea.SCALARS: 0, ea.TENSORS: 1, ea.IMAGES: 1,
                                                              ea.AUDIO: 1, ea.HISTOGRAMS: 1,
                                                              ea.COMPRESSED_HISTOGRAMS: 1})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _read_csv(path: Path) -> dict[str, Series]:
    out: dict[str, Series] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise ValueError(f"{str(path)!r} has no 'step' column: not a Lightning CSVLogger metrics file; pass a "
                             "directory whose metrics.csv files CSVLogger wrote, or remove this one")
        for row in reader:
            step = int(row["step"])
            for name, value in row.items():
                # CSVLogger writes one row per logging call: the other metrics' cells are empty.
                if name != "step" and value not in ("", None):
                    out.setdefault(name, []).append((step, float(value)))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the metrics logged under ``run_dir`` (see the module docstring) into a PNG and return its path.

    Args:
        run_dir: a logger's ``save_dir``, a run's version directory, or anything above them.
        out: the PNG to write (default ``<run_dir>/metrics.png``); its directory is created.

    Raises:
        FileNotFoundError: no TensorBoard event file or ``metrics.csv`` under ``run_dir``.
        ValueError: logs were found, but none of the metrics drawn here (the message lists what was logged).
    """
    # Agg on a Figure of our own, not pyplot: no display, and the caller's pyplot backend and figures stay as they are.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    root = Path(run_dir)
    runs = read_runs(root)
    logged = {name for metrics in runs.values() for name in metrics}
    drawn = panels(logged)
    if not drawn:
        wanted = ", ".join(s.shown for s in _SPECS)
        raise ValueError(f"None of the metrics logged under {str(root)!r} is plotted (logged: {sorted(logged)}; "
                         f"plotted: {wanted}); log one of those names, or pass the directory of a run that did")
    path = Path(out) if out is not None else root / PNG_NAME
    ncols = 1 if len(drawn) == 1 else 2
    nrows = math.ceil(len(drawn) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.2 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    specs = {s.title: s for s in _SPECS}
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ("-", "--", ":", "-.")
    for ax, panel in zip(flat, drawn):
        spec = specs[panel.title]
        positive = True
        for i, name in enumerate(panel.metrics):
            for j, (label, metrics) in enumerate(runs.items()):
                if name not in metrics:
                    continue
                xs = [s for s, _ in metrics[name]]
                # inf/nan (a skipped step's gradient norm) leave a gap instead of breaking the axis limits
                ys = [v if math.isfinite(v) else math.nan for _, v in metrics[name]]
                positive = positive and all(v > 0 for v in ys if not math.isnan(v))
                few = len(xs) <= 30  # a handful of points (validation) would be invisible as a bare line
                # several runs: one colour per run, so its train and val loss read as a pair
                color, dash = (colors[i % len(colors)], "-") if len(runs) == 1 else \
                    (colors[j % len(colors)], dashes[i % len(dashes)])
                ax.plot(xs, ys, label=name if len(runs) == 1 else f"{name} [{label}]", color=color, linestyle=dash,
                        drawstyle="steps-post" if spec.steps else "default", marker="o" if few else None,
                        markersize=3, linewidth=1.2)
        if spec.log_base is not None and positive:
            ax.set_yscale("log", base=spec.log_base)
        if spec.integer:
            top = max(1.0, ax.get_ylim()[1])
            ax.set_ylim(-0.04 * top, top)  # 0 just above the frame, so a line of zeros stays visible
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if spec.eng:
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(panel.metrics) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in flat[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(f"{'/'.join(root.resolve().parts[-2:])}: logged metrics", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The panel titles go into the PNG's text chunk, so a reader of the file knows what it shows without OCR.
    fig.savefig(path, dpi=110, metadata={"Title": f"metrics of {root}",
                                         "Description": "; ".join(p.title for p in drawn)})
    return path


def main(argv: list[str]) -> None:
    """``effi plot RUN_DIR [--out FILE]``: write the run's metrics PNG and say where it went."""
    p = argparse.ArgumentParser(prog="effi plot", description="Draw a run's logged metrics (TensorBoard event files "
                                "or CSVLogger metrics.csv, searched recursively) into a PNG.")
    p.add_argument("run_dir", help="a logger's save_dir or a run's version directory, e.g. runs/lightning_logs/"
                   "version_0")
    p.add_argument("--out", default=None, help=f"PNG to write (default: RUN_DIR/{PNG_NAME})")
    a = p.parse_args(argv)
    try:
        path = plot_run(a.run_dir, a.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))  # exits 2 with the usage line, like any other bad argument
    print(f"effi plot: wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
