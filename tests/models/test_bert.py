import pytest
import torch

from lightning_effi.models import BertEncoder, BertMLMLightningModule
from lightning_effi.models.bert import mlm_mask
from lightning_effi.models.data import MASK_ID


def test_mask_statistics_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (400, 500), generator=g)
    out, labels = mlm_mask(ids, generator=g)
    chosen = labels != -100
    n = chosen.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.003
    # labels hold the original tokens exactly where chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    masked = (out == MASK_ID) & chosen
    changed = (out != ids) & (out != MASK_ID) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # 10% random: of those, 1/256 draw their own token again, so "changed" is slightly under 10%
    assert abs(changed.sum().item() / n - 0.1 * 255 / 256) < 0.01
    kept = chosen & (out == ids)
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 256)) < 0.01


def test_mask_is_deterministic_with_generator():
    ids = torch.randint(0, 256, (4, 64))
    a = mlm_mask(ids, generator=torch.Generator().manual_seed(3))
    b = mlm_mask(ids, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_encoder_is_bidirectional():
    torch.manual_seed(0)
    m = BertEncoder(vocab_size=260, block_size=16, n_layer=2, n_head=2, d_model=32).double().eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 12] = (x[0, 12] + 1) % 256
    with torch.no_grad():
        a, b = m(x), m(y)
    assert a.shape == (1, 16, 260)
    assert (a[0, :12] - b[0, :12]).abs().max() > 1e-6  # earlier positions see the later token


def test_training_step_uses_only_masked_positions():
    torch.manual_seed(0)
    mod = BertMLMLightningModule(block_size=16, n_layer=1, n_head=2, d_model=32)
    batch = {"input_ids": torch.randint(0, 256, (4, 16))}
    batch["labels"] = batch["input_ids"].clone()
    torch.manual_seed(5)
    loss_sum, n = mod.compute_loss(batch)
    torch.manual_seed(5)
    _, labels = mlm_mask(batch["input_ids"])
    assert int(n) == int((labels != -100).sum()) > 0


def test_bad_mask_prob():
    with pytest.raises(ValueError, match="mask_prob 0.0"):
        BertMLMLightningModule(mask_prob=0.0)
