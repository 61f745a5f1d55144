"""Lamb's C++ CPU kernel (lightning_effi.optim.cpu_kernel): tensors of many blocks against the float64 reference, the
same result on any thread count, the fallback when it cannot be built, and a build that a stale lock cannot hang."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_effi.optim import Lamb, cpu_kernel
from tests.optim._reference import ReferenceLamb

# Several of the kernel's 2**14-element blocks, a partial last block, and a tensor smaller than one block.
SHAPES = [(40_000,), (2 * 16_384 + 5,), (300, 129), (33,), (0,)]
REF = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, bias_correction=True, trust_clip=None,
           weight_norm_clip=None, adapt=True)


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(dtype)) for s in SHAPES]


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(atol=1e-11, rtol=1e-10)),
                                       (torch.float32, dict(atol=2e-5, rtol=2e-5))], ids=["float64", "float32"])
def test_many_block_tensors_match_the_float64_reference(dtype, tol):
    params = _params(dtype)
    b = {"trust_clip": (0.1, 0.9), "weight_norm_clip": (0.5, 60.0), "bias_correction": False}
    groups = [{"params": params[:2]}, {"params": params[2:], **b}]
    opt = Lamb(groups, lr=REF["lr"], weight_decay=REF["weight_decay"], eps=REF["eps"], max_grad_norm=30.0,
               fused=True)
    ref = ReferenceLamb(params, [{"idx": [0, 1], **REF}, {"idx": [2, 3, 4], **REF, **b}], max_grad_norm=30.0)
    gen = torch.Generator().manual_seed(1)
    bound = False
    for _ in range(6):
        grads = _grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ratios = ref.step(grads)
        bound |= any(r == pytest.approx(0.1) for r in ratios)
        for k, p in enumerate(params):
            torch.testing.assert_close(p.detach().double(), ref.x[k], **tol, msg=f"param {k}")
        torch.testing.assert_close(opt.trust_ratios.double(), torch.tensor(ratios, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)
    assert opt._workspace()["prepared"][1] == "cpu_fused"
    # the case tests the trust clip only if it bound (the weight-norm clip binds on the (300, 129) tensor)
    assert bound


def _run(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = _params(torch.float32, seed=3)
        opt = Lamb(params, lr=1e-2)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            for p, g in zip(params, _grads(params, gen)):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in params], opt.trust_ratios.clone()
    finally:
        torch.set_num_threads(before)


def test_same_bits_on_one_and_two_threads():
    # Partial sums are per fixed block, not per thread: the trust ratios, hence the weights, do not depend on the
    # machine's core count.
    pa, ra = _run(1)
    pb, rb = _run(2)
    assert torch.equal(ra, rb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_in_place_writes_bump_version_counters():
    params = _params(torch.float32)[:2]
    opt = Lamb(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    versions = [p._version for p in params] + [opt.state[p][k]._version for p in params for k in ("exp_avg",
                                                                                                    "exp_avg_sq")]
    opt.step()
    after = [p._version for p in params] + [opt.state[p][k]._version for p in params for k in ("exp_avg",
                                                                                                 "exp_avg_sq")]
    assert all(b > a for a, b in zip(versions, after))


def test_default_cpu_path_is_the_kernel_and_foreach_true_is_not():
    p = [torch.nn.Parameter(torch.randn(10))]
    p[0].grad = torch.randn(10)
    a, b = Lamb(p), Lamb(p, foreach=True)
    a.step()
    b.step()
    assert a._workspace()["prepared"][1] == "cpu_fused"
    assert b._workspace()["prepared"][1] == "foreach"


def test_mixed_dtypes_take_the_foreach_phases_and_stay_exact():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(20, generator=gen).float()]
    a = [torch.nn.Parameter(x.clone()) for x in xs]
    b = [torch.nn.Parameter(x.clone()) for x in xs]
    oa, ob = Lamb(a, lr=0.05), Lamb(b, lr=0.05, foreach=True)
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen, dtype=pa.dtype)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-6)


def _fresh(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setattr(cpu_kernel, "_warned", False)


@pytest.mark.parametrize("cause", ["env", "build"])
def test_unavailable_kernel_falls_back_to_foreach_with_one_warning(monkeypatch, cause):
    _fresh(monkeypatch)
    if cause == "env":
        monkeypatch.setenv(cpu_kernel.ENV, "0")
        expect = "it is switched off by LIGHTNING_EFFI_LAMB_CPU_KERNEL=0"
    else:
        def broken(name, build_dir):
            raise RuntimeError("Error building extension 'effi_lamb_cpu': g++: not found\nmore compiler output")

        monkeypatch.setattr(cpu_kernel, "_build", broken)
        expect = r"building it failed \(RuntimeError: Error building extension 'effi_lamb_cpu': g\+\+: not found\)"
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(30, generator=gen), torch.randn(4, 5, generator=gen)]
    a = [torch.nn.Parameter(x.clone()) for x in xs]
    b = [torch.nn.Parameter(x.clone()) for x in xs]
    oa, ob = Lamb(a), Lamb(b, foreach=True)
    with pytest.warns(RuntimeWarning, match=f"CPU kernel is not available: {expect}. Using the foreach path"):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    assert oa._workspace()["prepared"][1] == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per optimizer
        Lamb([torch.nn.Parameter(torch.randn(3))]).step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    with pytest.raises(RuntimeError, match=f"fused=True\\) cannot run: .*{expect}"):
        Lamb(a, fused=True)


def test_build_key_follows_the_cpu(monkeypatch):
    # -march=native: a cache shared by two kinds of CPU (an NFS home) must keep one build per kind
    first = cpu_kernel._name()
    monkeypatch.setattr(cpu_kernel, "_cpu_identity", lambda: "vendor_id : other\nflags : sse2")
    assert cpu_kernel._name() != first and cpu_kernel._name().startswith("effi_lamb_cpu_")


def test_build_removes_a_stale_torch_lock_under_its_flock(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    (tmp_path / "lock").write_text("")  # what a build killed midway leaves; torch's loader would wait on it forever
    seen = {}

    def fake_load(name, sources, **kw):
        seen["lock_left"] = (tmp_path / "lock").exists()
        seen["build_directory"] = kw["build_directory"]
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu_kernel._build("effi_lamb_cpu_test", tmp_path) == "module"
    assert seen == {"lock_left": False, "build_directory": str(tmp_path)}


def test_real_build_in_a_fresh_directory_with_a_stale_lock(tmp_path):
    """The real compiler, in its own process and cache: builds, steps, and is not held up by a left-over lock."""
    name = cpu_kernel._name()
    stale = tmp_path / "lightning_effi" / name / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    code = ("import torch; from lightning_effi.optim import Lamb; p = torch.nn.Parameter(torch.ones(5)); "
            "p.grad = torch.ones(5); o = Lamb([p]); o.step(); "
            "assert o._workspace()['prepared'][1] == 'cpu_fused'; print('ok', float(p.sum()))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
    assert any(stale.parent.glob("*.so"))


def test_a_build_lock_held_too_long_gives_up_instead_of_waiting_forever(monkeypatch, tmp_path):
    import fcntl

    monkeypatch.setattr(cpu_kernel, "_WAIT_S", 0.5)
    with open(tmp_path / "effi-build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: blocks this process's own attempt too
        with pytest.raises(TimeoutError, match="held the build lock .* for over 0 s"):
            cpu_kernel._build("effi_lamb_cpu_test", tmp_path)
