"""LAMB's CPU kernel: ``csrc/lamb_cpu.cpp``, built with torch's extension builder the first time a CPU step needs it
(as DeepSpeed builds its CPU Adam) and cached per machine under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in ``lightning_effi/``.

It is the default for unsharded float32/float64 parameters on the CPU and what ``Lamb(fused=True)`` means there.
When it cannot be built (no C++ compiler with OpenMP, no ninja, not Linux) the default falls back to the foreach path
with one warning that says why; ``LIGHTNING_EFFI_LAMB_CPU_KERNEL=0`` skips the build altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["cpu_kernel_unavailable_reason", "kernel_applies", "load", "step"]

_SOURCE = Path(__file__).with_name("csrc") / "lamb_cpu.cpp"
# -march=native: the build is keyed to this CPU (see _name), so a cache shared between machines (an NFS home) never
# hands one CPU another's instructions. -fno-math-errno lets sqrt vectorise.
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
ENV = "LIGHTNING_EFFI_LAMB_CPU_KERNEL"
_SUPPORTED = (torch.float32, torch.float64)

_WAIT_S = 900.0  # for another process's build; generous, a build takes a small fraction of it
_log = logging.getLogger(__name__)
_loaded: dict[str, Any] = {}  # "module" or "error", once per process
_warned = False


def _cpu_identity() -> str:
    """Model and instruction-set flags of this CPU (Linux), the part of the cache key -march=native depends on."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("vendor_id", "model name", "flags", "Features", "CPU part") and line not in keep:
            keep.append(line)
    return "\n".join(keep)


def _name() -> str:
    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_CFLAGS + _LDFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return "effi_lamb_cpu_" + h.hexdigest()[:16]


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(root) / "lightning_effi"


def _build(name: str, build_dir: Path):
    """torch's JIT build under an exclusive flock. torch guards a build with a lock file that a killed build leaves
    behind, after which every later load waits forever; a flock is released by the OS when its holder dies, and
    while it is held nobody else is building, so a lock file found then is stale and removed."""
    import fcntl

    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "effi-build.flock", "w") as fh:
        deadline = time.monotonic() + _WAIT_S
        while True:  # a builder that hangs must not hold this process forever: give up and fall back
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held the build lock in {build_dir} for over "
                                       f"{_WAIT_S:.0f} s") from None
                time.sleep(0.2)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            if not (build_dir / f"{name}.so").exists():
                _log.info("Lamb: building the CPU kernel in %s (once per machine and CPU kind)", build_dir)
            # copies: torch's builder appends to the lists it is given, and _name() hashes them
            return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                                      build_directory=str(build_dir), verbose=False)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load():
    """The built extension module; raises RuntimeError saying why it cannot be had."""
    if "module" in _loaded:
        return _loaded["module"]
    if "error" in _loaded:
        raise RuntimeError(_loaded["error"])
    reason = _static_reason()
    if reason is None:
        try:
            name = _name()
            _loaded["module"] = _build(name, _build_root() / name)
            return _loaded["module"]
        except Exception as e:  # noqa: BLE001 - any build or import failure means "not available", with its message
            # the compiler's own complaint where there is one (torch's message starts with the command line)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "error" in ln.lower() and "error building" not in ln.lower()),
                         lines[0] if lines else type(e).__name__)
            reason = f"building it failed ({type(e).__name__}: {first[:300]})"
    _loaded["error"] = reason
    raise RuntimeError(reason)


def _static_reason() -> str | None:
    if os.environ.get(ENV, "1") == "0":
        return f"it is switched off by {ENV}=0"
    if not sys.platform.startswith("linux"):
        return f"it is built on Linux only (this is {sys.platform})"
    if not _SOURCE.is_file():
        return f"its source {_SOURCE} is missing from the installed package"
    return None


def cpu_kernel_unavailable_reason(tensors=None) -> str | None:
    """Why the CPU kernel cannot step ``tensors`` (None: it can); builds it on first call. ``tensors=None`` checks
    the machine only."""
    if tensors is not None:
        bad = {t.dtype for t in tensors} - set(_SUPPORTED)
        if bad:
            return f"unsupported parameter dtypes {sorted(map(str, bad))} (the CPU kernel takes float32 and float64)"
        if any(t.device.type != "cpu" for t in tensors):
            return "a parameter is not on the CPU"
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


def warn_fallback(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    hint = "" if reason.startswith("it is switched off") else (
        f" Install g++ with OpenMP and ninja to have it, or set {ENV}=0 to skip trying.")
    warnings.warn(f"Lamb: the CPU kernel is not available: {reason}. Using the foreach path instead (about twice the "
                  f"step time).{hint}", RuntimeWarning, stacklevel=3)


def kernel_applies(plan) -> bool:
    """Unsharded units of one dtype in {float32, float64}, all contiguous: what the kernel steps."""
    if not plan.p:
        return False
    dtype = plan.p[0].dtype
    if dtype not in _SUPPORTED:
        return False
    return all(t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
               for t in (*plan.p, *plan.g, *plan.m, *plan.v))


def step(plan, steps: list[Tensor], hyper: Tensor, coef: float) -> Tensor:
    """One LAMB step of every unit of ``plan`` (one unit per logical parameter). ``steps``: each unit's float32 CPU
    step count, already advanced. ``hyper``: float64 ``[units, 11]``, per unit lr, beta1, beta2, eps, weight_decay,
    bias_correction, adapt (1 or 0), weight_norm_clip lo/hi, trust_clip lo/hi (absent clips: 0, inf). Returns the
    trust ratios as float32."""
    return load().lamb_step(plan.p, plan.g, plan.m, plan.v, steps, hyper, float(coef)).to(torch.float32)
