import pytest
import torch

from lightning_effi.models import GPT, Block, GPTLightningModule
from lightning_effi.models.gpt import token_loss


def _model(**kw):
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 32, **kw}).eval()


@pytest.mark.parametrize("B,T", [(1, 1), (3, 16), (2, 7)])
def test_shapes(B, T):
    m = _model()
    assert m(torch.randint(0, 50, (B, T))).shape == (B, T, 50)


def test_tied_embeddings_and_blocks():
    m = _model()
    assert m.lm_head.weight is m.wte.weight
    assert sum(isinstance(x, Block) for x in m.modules()) == 2
    # the tied weight is one parameter: named_parameters lists wte.weight and not lm_head.weight
    names = [n for n, _ in m.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names


def test_causality_future_tokens_do_not_change_past_logits():
    m = _model().double()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 50, (2, 7))
    assert not torch.equal(x[:, 9:], y[:, 9:])
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-12)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the changed positions do see their own inputs


def test_matches_manual_attention_reference():
    """SDPA with is_causal equals a hand-written masked softmax attention (float64), with qkv's output rows
    grouped by head: rows [3*h*d, 3*h*d + d) are head h's query, the next d its key, the next d its value."""
    m = _model(n_layer=1).double()
    x = torch.randint(0, 50, (2, 16))
    blk = m.blocks[0]
    h = m.wte(x) + m.wpe(torch.arange(16))
    a = blk.attn
    B, T, C = h.shape
    hn = blk.ln_1(h)
    H, d = 2, C // 2
    w, b = a.qkv.weight, a.qkv.bias

    def rows(which):  # which: 0 = query, 1 = key, 2 = value
        idx = torch.cat([torch.arange(3 * h * d + which * d, 3 * h * d + (which + 1) * d) for h in range(H)])
        return (hn @ w[idx].T + b[idx]).view(B, T, H, d).transpose(1, 2)

    q, k, v = rows(0), rows(1), rows(2)
    att = (q @ k.transpose(-1, -2)) / (C // 2) ** 0.5
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    ref_attn = a.proj((att @ v).transpose(1, 2).reshape(B, T, C))
    ref = h + ref_attn
    ref = ref + blk.mlp(blk.ln_2(ref))
    ref = m.lm_head(m.ln_f(ref))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-9, atol=1e-9)


def test_compiles_without_graph_breaks():
    # aot_eager traces through dynamo + AOTAutograd (what inductor consumes) without needing a C++ toolchain;
    # fullgraph=True turns any graph break into an error. The inductor backend is exercised by the GPU test.
    m = _model()
    x = torch.randint(0, 50, (2, 16))
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(cm(x), m(x))
    loss = cm(x).sum()
    loss.backward()
    assert m.wte.weight.grad is not None


@pytest.mark.gpu
def test_compiles_with_inductor_on_gpu():
    m = _model().cuda()
    x = torch.randint(0, 50, (2, 16), device="cuda")
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), m(x), rtol=2e-3, atol=2e-3)


def test_token_loss_ignores_padding():
    logits = torch.randn(2, 4, 10, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, 4, 5]])
    s, n = token_loss(logits, labels)
    assert int(n) == 5
    lp = logits.log_softmax(-1)
    ref = -sum(lp[b, t, labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] != -100)
    torch.testing.assert_close(s, ref)


def _loss_reference(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy written out: sum(logsumexp(logits) - logit[y]) over labels != -100 (float64 x)."""
    flat, y = x.flatten(0, 1), labels.flatten()
    keep = y != -100
    return (torch.logsumexp(flat[keep], dim=-1) - flat[keep].gather(1, y[keep][:, None])[:, 0]).sum()


def _fused_loss_case(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 257, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 257, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5] = -100
    return logits, labels.to(device)


def _check_fused_loss(logits, labels, grad_atol):
    from lightning_effi.models.gpt import fused_token_loss

    s, n = fused_token_loss(logits, labels)
    assert int(n) == int((labels != -100).sum())
    x = logits.detach().double().requires_grad_()
    ref = _loss_reference(x, labels)
    torch.testing.assert_close(s.double(), ref.detach(), rtol=1e-5, atol=0)  # fp32 accuracy
    (grad,) = torch.autograd.grad(s, logits)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert grad.dtype == logits.dtype  # written in the logits' dtype, no fp32 copy handed back
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=grad_atol)


def test_fused_loss_matches_float64_reference_and_module_switch(monkeypatch):
    import lightning_effi.models._lm as gpt_mod

    # aot_eager: dynamo + AOTAutograd without a C++ toolchain; inductor's kernels are checked by the GPU test.
    real = torch.compile
    monkeypatch.setattr(gpt_mod, "_COMPILED_TOKEN_LOSS", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    _check_fused_loss(*_fused_loss_case("cpu", torch.float32), grad_atol=1e-6)
    # the module's switch: auto is eager on CPU; True goes through the compiled function
    calls = []
    monkeypatch.setattr(gpt_mod, "fused_token_loss", lambda *a: calls.append(1) or token_loss(*a))
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "labels": torch.randint(0, 50, (2, 8))}
    for fused, expect in ((None, 0), (False, 0), (True, 1)):
        calls.clear()
        GPTLightningModule(vocab_size=50, block_size=16, fused_loss=fused).compute_loss(batch)
        assert len(calls) == expect, fused
    with pytest.raises(ValueError, match="fused_loss 'yes'"):
        GPTLightningModule(fused_loss="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_loss_inductor_on_gpu_matches_float64_reference(dtype):
    import lightning_effi.models._lm as gpt_mod

    gpt_mod._COMPILED_TOKEN_LOSS = None
    # bf16 logits are upcast inside the fused kernel: the loss keeps fp32 accuracy (a bf16 log-softmax would be off
    # by ~1e-3 relative); the gradient is rounded to bf16 (probabilities <= 1: error <= 2**-9)
    _check_fused_loss(*_fused_loss_case("cuda", dtype), grad_atol=1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30, "n_head": 4}, "d_model 30.*divisible by n_head=4"),
        ({"n_layer": 0}, "n_layer 0"),
        ({"block_size": -1}, "block_size -1"),
        ({"vocab_size": 2.5}, "vocab_size 2.5"),
        ({"dropout": 1.0}, "dropout 1.0"),
    ],
)
def test_bad_shapes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT(**kwargs)


def test_sequence_longer_than_block_raises():
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"loss_reduction": "avg"}, "loss_reduction 'avg'"), ({"warmup_steps": -1}, "warmup_steps -1"),
     ({"min_lr_ratio": 2.0}, "min_lr_ratio 2.0"), ({"max_steps": 0}, "max_steps 0")],
)
def test_module_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTLightningModule(**kwargs)


def test_lr_schedule_warmup_then_cosine():
    from lightning_effi.models._common import warmup_cosine

    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_module_state_dict_holds_the_network_once():
    for compile_ in (False, True):
        keys = list(GPTLightningModule(compile=compile_).state_dict())
        assert keys and all(k.startswith("model.") for k in keys), keys[:5]


def _fit_one_step(module, dm, **trainer_kw):
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (GPTLightningModule(vocab_size=200), {}), "vocab_size 200 is smaller than the data's vocabulary"),
        (lambda: (GPTLightningModule(), {"task": "mlm"}), "needs data with task='causal'"),
    ],
)
def test_data_mismatch_raises_before_training(make, match):
    from lightning_effi.models import CorpusDataModule

    module, dm_kw = make()
    w0 = module.model.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        _fit_one_step(module, CorpusDataModule(max_bytes=100_000, block_size=32, **dm_kw))
    assert torch.equal(module.model.wte.weight, w0)


def test_epoch_run_with_accumulation_schedule_needs_max_steps():
    import lightning.pytorch as pl

    from lightning_effi.callbacks import AccumulationScheduler
    from lightning_effi.models import CorpusDataModule

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[AccumulationScheduler({0: 4})], enable_model_summary=False)
    with pytest.raises(ValueError, match="set Trainer\\(max_steps=...\\)"):
        trainer.fit(GPTLightningModule(block_size=32), datamodule=CorpusDataModule(max_bytes=100_000, block_size=32))


def test_tokens_counter_syncs_only_on_logging_steps():
    """train/tokens is summed over ranks (a barrier + all_reduce in Lightning) only where the logger writes."""
    from types import SimpleNamespace

    from lightning_effi.models._lm import _logs_this_step

    def trainer(world=2, stepped=0, every=50, logger=True, stop=False):
        return SimpleNamespace(world_size=world, logger=object() if logger else None, progress_bar_callback=None,
                               global_step=stepped, log_every_n_steps=every, should_stop=stop)

    assert _logs_this_step(None) and not _logs_this_step(trainer(world=1, stepped=3))
    assert _logs_this_step(trainer(stepped=49)) and _logs_this_step(trainer(stepped=99))
    assert not _logs_this_step(trainer(stepped=48)) and not _logs_this_step(trainer(stepped=50))
    assert _logs_this_step(trainer(stepped=7, stop=True))
    assert not _logs_this_step(trainer(stepped=49, logger=False))


@pytest.mark.parametrize("with_logger, sync_free_bar", [(False, False), (True, False), (True, True)])
def test_training_step_reads_no_metric_back_except_on_logging_steps(tmp_path, monkeypatch, with_logger,
                                                                   sync_free_bar):
    """Lightning calls .item() on prog_bar metrics at the end of every batch once they were logged (a device sync on
    GPUs). Without a progress bar, or with SyncFreeProgressBar, train/loss is no prog_bar metric: only the logger reads
    values back, on its steps, and the CSV still gets both metrics there; SyncFreeProgressBar shows the loss from the
    module's host-side copy."""
    import csv

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lightning_effi.callbacks import SyncFreeProgressBar

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": t[:-1], "labels": t[1:]} for t in torch.randint(0, 50, (32, 17), generator=g)]
    items_per_batch: list[int] = []
    real_item = torch.Tensor.item

    def counting_item(self):
        if items_per_batch:  # from the first batch on
            items_per_batch[-1] += 1
        return real_item(self)

    class Count(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            items_per_batch.append(0)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    logger = CSVLogger(tmp_path) if with_logger else False
    bar = [SyncFreeProgressBar()] if sync_free_bar else []
    trainer = pl.Trainer(max_steps=8, log_every_n_steps=4, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=sync_free_bar, enable_model_summary=False, callbacks=[Count(), *bar])
    model = GPTLightningModule(vocab_size=50, block_size=16, warmup_steps=1,
                               optimizer=lambda params: torch.optim.SGD(params, lr=0.1))  # SGD: no .item() itself
    trainer.fit(model, DataLoader(rows, batch_size=4))
    logging_steps = {3, 7} if with_logger else set()  # batch indices whose step is a multiple of 4
    assert [i for i, n in enumerate(items_per_batch) if n] == sorted(logging_steps)
    if with_logger:
        with open(next(tmp_path.rglob("metrics.csv"))) as f:
            logged = [r for r in csv.DictReader(f) if r.get("train/loss")]
        assert [int(r["step"]) for r in logged] == [3, 7]
        assert all(float(r["train/tokens"]) > 0 for r in logged)
    if sync_free_bar:  # the bar shows the last step's loss (on the CPU the host copy is the current value)
        shown = bar[0].get_metrics(trainer, model)["train/loss"]
        assert shown == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-6)


def test_module_with_host_loss_slots_still_copies_and_pickles():
    import copy
    import pickle
    import threading

    from lightning_effi.models._lm import _can_fuse_loss

    model = GPTLightningModule(vocab_size=50, block_size=16)
    model._note_loss(torch.full((), 1.5))
    model._host_loss._events = [threading.Lock()] * 4  # stands in for CUDA events: not picklable either
    assert copy.deepcopy(model)._host_loss.pushed == 0
    assert pickle.loads(pickle.dumps(model))._host_loss.pushed == 0
    assert model._host_loss.pushed == 1  # the live module keeps its slots
    assert not _can_fuse_loss(torch.device("cpu"))  # auto fused_loss: never on the CPU


@pytest.mark.gpu
def test_host_loss_copy_on_gpu_needs_no_sync():
    from lightning_effi.models._lm import _HOST_LOSS_SLOTS

    model = GPTLightningModule(vocab_size=50, block_size=16)
    assert model.progress_bar_host_metrics() == {}
    torch.cuda._sleep(50_000_000)  # keep the stream busy: no copy can land before the sleep ends
    model._note_loss(torch.full((), 2.5, device="cuda"))
    assert model.progress_bar_host_metrics() == {}  # not waited for
    torch.cuda.synchronize()
    assert model.progress_bar_host_metrics() == {"train/loss": 2.5}
    # A host a few steps ahead of the GPU: the newest copy is still queued when the bar reads, older ones have
    # landed; the bar must show the newest landed one (one re-used slot would show nothing new until a sync).
    import time

    for step in range(_HOST_LOSS_SLOTS):
        model._note_loss(torch.full((), float(step), device="cuda"))
        torch.cuda._sleep(40_000_000)  # ~20 ms of GPU work after each loss
    time.sleep(0.03)  # the GPU is one to two sleeps in
    shown = model.progress_bar_host_metrics()["train/loss"]
    assert shown in [float(s) for s in range(_HOST_LOSS_SLOTS - 1)], shown
    torch.cuda.synchronize()
    assert model.progress_bar_host_metrics() == {"train/loss": float(_HOST_LOSS_SLOTS - 1)}


def test_num_params_counts_full_sizes_under_zero3_placeholders():
    """ZeRO-3 replaces each parameter by an empty placeholder carrying ds_numel: the count must not drop to 0."""
    model = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)
    full = sum(p.numel() for p in model.parameters())
    wpe = model.wpe.weight.numel()
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert model.num_params(non_embedding=False) == full
    assert model.num_params() == full - wpe
