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
    """SDPA with is_causal equals a hand-written masked softmax attention (float64)."""
    m = _model(n_layer=1).double()
    x = torch.randint(0, 50, (2, 16))
    blk = m.blocks[0]
    h = m.wte(x) + m.wpe(torch.arange(16))
    a = blk.attn
    B, T, C = h.shape
    hn = blk.ln_1(h)
    q, k, v = a.qkv(hn).split(C, dim=2)
    q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in (q, k, v))
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
    from lightning_effi.callbacks import AccumulationScheduler
    from lightning_effi.models import CorpusDataModule

    import lightning.pytorch as pl

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[AccumulationScheduler({0: 4})], enable_model_summary=False)
    with pytest.raises(ValueError, match="set Trainer\\(max_steps=...\\)"):
        trainer.fit(GPTLightningModule(block_size=32), datamodule=CorpusDataModule(max_bytes=100_000, block_size=32))


def test_tokens_counter_syncs_only_on_logging_steps():
    """train/tokens is summed over ranks (a barrier + all_reduce in Lightning) only where the logger writes."""
    from types import SimpleNamespace

    from lightning_effi.models.gpt import _logs_this_step

    def trainer(world=2, stepped=0, every=50, logger=True, stop=False):
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=stepped))
        return SimpleNamespace(world_size=world, logger=object() if logger else None, progress_bar_callback=None,
                               fit_loop=loop, log_every_n_steps=every, should_stop=stop)

    assert _logs_this_step(None) and _logs_this_step(trainer(world=1, stepped=3))
    assert _logs_this_step(trainer(stepped=49)) and _logs_this_step(trainer(stepped=99))
    assert not _logs_this_step(trainer(stepped=48)) and not _logs_this_step(trainer(stepped=50))
    assert _logs_this_step(trainer(stepped=7, stop=True))
    assert not _logs_this_step(trainer(stepped=49, logger=False))
