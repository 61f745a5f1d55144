"""Flat-partition mode (single process), AMP grad_scale/found_inf, and telemetry, on every path."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_effi.optim import FlatLayout, Lamb
from tests.optim._reference import ReferenceLamb

PATHS = [
    pytest.param("cpu", "single", id="cpu-single"),
    pytest.param("cpu", "foreach", id="cpu-foreach"),
    pytest.param("cpu", "fused", id="cpu-fused"),
    pytest.param("cuda", "foreach", id="cuda-foreach", marks=pytest.mark.gpu),
    pytest.param("cuda", "fused", id="cuda-fused", marks=pytest.mark.gpu),
]
KW = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SHAPES = [(6, 5), (7,), (0,), (3, 4), (5,)]


@pytest.mark.parametrize("device,path", PATHS)
def test_flat_layout_single_process_matches_reference(device, path):
    """Two flat partitions (two groups) with padding between segments: the same steps as per-tensor LAMB."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    groups_idx = [[0, 1, 2], [3, 4]]
    hyper = [dict(weight_decay=0.1, adapt=True), dict(weight_decay=0.0, adapt=False)]
    flats, layouts, where = [], [], {}
    for gi, idx in enumerate(groups_idx):
        segs, off = [], 1  # one element of leading padding, and 2 between segments
        for i in idx:
            n = xs[i].numel()
            segs.append((i, off, n))
            where[i] = (gi, off, n)
            off += n + 2
        flat = torch.full((off + 3,), 7.0, dtype=torch.float64)  # padding must stay exactly 7
        for i, o, n in segs:
            flat[o : o + n] = xs[i].reshape(-1)
        flats.append(torch.nn.Parameter(flat.to(device)))
        layouts.append(FlatLayout(segments=tuple(segs), num_logical=len(SHAPES)))
    opt = Lamb([{"params": [flats[g]], **hyper[g]} for g in range(2)], lr=0.05, max_grad_norm=2.0, **KW[path])
    for g, lay in zip(opt.param_groups, layouts):
        g["flat_layouts"] = [lay]
    ref = ReferenceLamb(xs, [
        {"idx": groups_idx[g], "lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-6, "bias_correction": True,
         "trust_clip": None, "weight_norm_clip": None, **hyper[g]} for g in range(2)
    ], max_grad_norm=2.0)
    for step in range(5):
        if step == 2:
            # Reloading in place (what a ZeRO engine does on resume) must keep the live flat_layouts.
            opt.load_state_dict(opt.state_dict())
            assert all("flat_layouts" in g for g in opt.param_groups)
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for gi, flat in enumerate(flats):
            fg = torch.full_like(flat, 1e6)  # huge padding grads: must not leak into norms or clipping
            for i in groups_idx[gi]:
                _, o, n = where[i]
                fg[o : o + n] = grads[i].reshape(-1).to(device)
            flat.grad = fg
        opt.step()
        ratios = ref.step(grads)
        for i in range(len(SHAPES)):
            gi, o, n = where[i]
            torch.testing.assert_close(flats[gi].detach()[o : o + n].cpu(), ref.x[i].reshape(-1), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(opt.trust_ratios.cpu().double(), torch.tensor(ratios, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6)
        for gi, flat in enumerate(flats):
            covered = torch.zeros(flat.numel(), dtype=torch.bool)
            for i in groups_idx[gi]:
                _, o, n = where[i]
                covered[o : o + n] = True
            assert (flat.detach().cpu()[~covered] == 7.0).all(), "padding was modified"
            assert opt.state[flat]["exp_avg"].shape == flat.shape, "state must stay flat"
    assert "flat_layouts" not in opt.state_dict()["param_groups"][0]


@pytest.mark.parametrize("device,path", PATHS)
def test_grad_scale_and_found_inf(device, path):
    """Scaled gradients + grad_scale give the unscaled step; found_inf skips it (nothing changes)."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    a = [torch.nn.Parameter(x.clone().to(device)) for x in xs]
    b = [torch.nn.Parameter(x.clone().to(device)) for x in xs]
    oa = Lamb(a, lr=0.1, max_grad_norm=0.7, **KW[path])
    ob = Lamb(b, lr=0.1, max_grad_norm=0.7, **KW[path])
    scale = torch.tensor(1024.0, device=device)
    for step in range(3):
        gs = [torch.randn(x.shape, generator=gen).to(device) for x in xs]
        for p, g in zip(a, gs):
            p.grad = g
        for p, g in zip(b, gs):
            p.grad = g * scale
        ob.grad_scale = scale
        ob.found_inf = torch.tensor(1.0 if step == 1 else 0.0, device=device)
        oa_before = [p.detach().clone() for p in b]
        if step != 1:
            oa.step()
        ob.step()
        if step == 1:
            assert all(torch.equal(p, q) for p, q in zip(b, oa_before))
            assert torch.isnan(ob.trust_ratios).all()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert float(ob.state[b[0]]["step"]) == 2.0


def test_every_path_takes_grad_scale_and_found_inf():
    # from GradScaler and LossScalingPrecision (the CPU paths read them on the host); fused=True on CPU parameters is
    # the C++ kernel, not the Triton one
    p = [torch.nn.Parameter(torch.randn(3))]
    for kw in ({}, {"foreach": False}, {"foreach": True}, {"fused": True}):
        assert Lamb(p, **kw)._step_supports_amp_scaling, kw


@pytest.mark.gpu
def test_fused_is_default_on_cuda_and_needs_no_host_sync():
    p = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")), torch.nn.Parameter(torch.randn(7, device="cuda"))]
    opt = Lamb(p, max_grad_norm=1.0)
    for q in p:
        q.grad = torch.randn_like(q)
    opt.step()  # warm-up: Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        r = opt.trust_ratios
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert r.is_cuda and r.shape == (2,) and math.isfinite(float(r.sum()))
    assert opt.state[p[0]]["step"].is_cuda


@pytest.mark.gpu
def test_fused_cuda_graph_replay_equals_eager_launches(monkeypatch):
    """After GRAPH_AFTER steps with an unchanged signature the fused step is replayed from a CUDA graph: bitwise the
    same as launching the kernels eagerly, with the learning rate changed every step and the gradients moved to new
    tensors mid-run (the graph is kept and pointed at them)."""
    import lightning_effi.optim.fused as FU

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(300, 70), (5,), (1,), (70000,), (0,)]
    a = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob, oc = (Lamb(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (a, b, c))
    oc_foreach = Lamb(c, lr=1e-2, weight_decay=0.1, foreach=True)
    del oc
    grads = [torch.empty(s, device="cuda") for s in shapes]
    captured = []
    for step in range(10):
        if step == 6:
            grads = [g.clone() for g in grads]
        for g in grads:
            g.normal_(generator=gen)
        for ps in (a, b, c):
            for p, g in zip(ps, grads):
                p.grad = g.clone() if ps is c else g
        for o in (oa, ob, oc_foreach):
            o.param_groups[0]["lr"] = 1e-2 * (1 + step)
        oa.step()
        monkeypatch.setattr(FU, "CUDA_GRAPHS", False)
        ob.step()
        monkeypatch.setattr(FU, "CUDA_GRAPHS", True)
        oc_foreach.step()
        captured.append(oa._workspace()["lamb_fused"].graph is not None)
        assert torch.equal(oa.trust_ratios, ob.trust_ratios), step
        for pa, pb, pc in zip(a, b, c):
            assert torch.equal(pa, pb), step
            torch.testing.assert_close(pa, pc, rtol=2e-5, atol=2e-6)
        for pa, pb in zip(a, b):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(oa.state[pa][key], ob.state[pb][key]), (step, key)
    assert ob._workspace()["lamb_fused"].graph is None
    # captured at the 3rd step, then replayed to the end
    assert captured == [False, False] + [True] * 8


@pytest.mark.gpu
def test_fused_cuda_graph_replay_follows_gradients_and_groups(monkeypatch):
    """The replay's checks against eager launches (no graphs), bitwise: a parameter that loses its gradient for
    some steps and gets it back, a parameter without a gradient from the start (in its own optimizer), and a
    parameter replaced in place in the group's list."""
    import lightning_effi.optim.fused as FU

    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(300, 70), (5,), (70000,), (131072,)]
    runs = {}
    for graphs in (True, False):
        monkeypatch.setattr(FU, "CUDA_GRAPHS", graphs)
        gen.manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
        frozen = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
        opt = Lamb(ps, lr=1e-2, weight_decay=0.1, fused=True)
        opt_frozen = Lamb(frozen, lr=1e-2, weight_decay=0.1, fused=True)
        # New gradient tensors every step at the same addresses, as autograd gives them after zero_grad
        bufs = [torch.empty(s, device="cuda") for s in shapes + shapes]
        for step in range(16):
            for b in bufs:
                b.normal_(generator=gen)
            for i, p in enumerate(ps):
                p.grad = None if (i == 1 and 5 <= step < 9) else bufs[i].view(p.shape)
            for i, p in enumerate(frozen):
                p.grad = None if i == 2 else bufs[len(shapes) + i].view(p.shape)
            if step == 12:
                new = torch.nn.Parameter(ps[0].detach().clone())
                new.grad = ps[0].grad
                opt.param_groups[0]["params"][0] = ps[0] = new
            opt.step()
            opt_frozen.step()
        runs[graphs] = (ps, frozen, opt, opt_frozen)
    (pa, fa, oa, ofa), (pb, fb, ob, ofb) = runs[True], runs[False]
    for x, y in zip(pa + fa, pb + fb):
        assert torch.equal(x, y)
    for (o1, ps1), (o2, ps2) in (((oa, pa), (ob, pb)), ((ofa, fa), (ofb, fb))):
        for x, y in zip(ps1, ps2):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert (x in o1.state) == (y in o2.state)
                if x in o1.state:
                    assert torch.equal(o1.state[x][key], o2.state[y][key])
    assert torch.equal(oa.trust_ratios, ob.trust_ratios)
    assert oa._workspace()["lamb_fused"].graph is not None and ofa._workspace()["lamb_fused"].graph is not None
    assert ofa._workspace()["replay"]["every"] is False
    assert "replay" in oa._workspace() and oa._workspace()["replay"]["every"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_fused_cuda_graph_replays_gradients_at_changing_addresses(monkeypatch, max_grad_norm):
    """Gradients that alternate between two address sets (other tensors living across steps make the allocator do
    that), a third set now and then, and one at an unaligned address: bitwise against eager launches, every step,
    with the learning rate changing. Without clipping one graph is captured and replays every later step, pointed at
    each step's gradients; an unaligned gradient needs kernels without the alignment hint (a new plan, captured
    again). A clipping graph reads the gradients in its norm, so moved gradients run eagerly."""
    import lightning_effi.optim.fused as FU

    gen = torch.Generator(device="cuda").manual_seed(2)
    shapes = [(300, 70), (5,), (70000,)]
    runs = {}
    for graphs in (True, False):
        monkeypatch.setattr(FU, "CUDA_GRAPHS", graphs)
        gen.manual_seed(2)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
        opt = Lamb(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm)
        sets = [[torch.empty(s, device="cuda") for s in shapes] for _ in range(3)]
        pool = torch.empty(70001, device="cuda")
        sets.append([sets[0][0], sets[0][1], pool[1:]])  # 4-byte, not 16-byte, aligned
        hits, graphs_seen = [], []
        real = Lamb._replay

        def spy(self, *a, _real=real, _hits=hits, **k):
            out = _real(self, *a, **k)
            _hits.append(out is not None)
            return out

        monkeypatch.setattr(Lamb, "_replay", spy)
        history = []
        for step in range(24):
            which = 2 if step in (13, 14) else 3 if step == 18 else step % 2
            for b in sets[which]:
                b.normal_(generator=gen)
            for p, b in zip(ps, sets[which]):
                p.grad = b.view(p.shape)
            opt.param_groups[0]["lr"] = 1e-2 * (1 + step % 3)
            opt.step()
            history.append([p.detach().clone() for p in ps])
            graphs_seen.append(opt._workspace()["lamb_fused"].graph)
        monkeypatch.setattr(Lamb, "_replay", real)
        runs[graphs] = (history, hits, graphs_seen, opt)
    for step, (a, b) in enumerate(zip(runs[True][0], runs[False][0])):
        for x, y in zip(a, b):
            assert torch.equal(x, y), step
    _, hits, seen, opt = runs[True]
    if max_grad_norm is None:
        # captured at step 2 and replayed; the unaligned step 18 rebuilds, captured again at step 20
        assert hits == [False] * 3 + [True] * 15 + [False] * 3 + [True] * 3, hits
        assert seen[2] is not None and all(g is seen[2] for g in seen[2:18])
        assert opt._workspace()["lamb_fused"].launches[0].consts["ALIGN"] == 1
    else:
        assert not any(hits), hits  # at most two steps in a row at one address set: never captured
        assert all(g is None for g in seen)
    assert runs[False][2][-1] is None
