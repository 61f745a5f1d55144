"""A tiny causal LM, padded variable-length data and a plain-torch float64 reference for accumulation tests.

Shared by tests/callbacks/test_accumulation.py and the distributed scripts (imported by path there).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

VOCAB = 13
IGNORE = -100


class TinyNet(torch.nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def token_loss(net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = net(batch["input_ids"])
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
    return loss_sum, (labels != IGNORE).sum()


class TinyLM(LightningModule):
    """``loss_reduction="sum"`` follows the token protocol; ``"mean"`` returns the per-token mean (naive)."""

    def __init__(self, loss_reduction: str = "sum", lr: float = 0.5, optimizer: str = "sgd", seed: int = 0,
                 with_tokens: bool = True, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyNet()
        self.loss_reduction, self.lr, self.opt_name = loss_reduction, lr, optimizer
        self.with_tokens, self.use_scheduler = with_tokens, scheduler
        self.losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int):
        loss_sum, n = token_loss(self.net, batch)
        loss = loss_sum if self.loss_reduction == "sum" else loss_sum / n.clamp_min(1)
        self.losses.append(float(loss_sum.detach() / n.clamp_min(1)))
        return {"loss": loss, "num_tokens": n} if self.with_tokens else {"loss": loss}

    def configure_optimizers(self):
        if self.opt_name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_batches(n_batches: int, batch_size: int = 2, max_len: int = 7, seed: int = 0) -> list[dict]:
    """Micro-batches of variable-length sequences, right-padded, labels -100 on padding (very uneven counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (batch_size, max_len), generator=g)
        labels = torch.randint(0, VOCAB, (batch_size, max_len), generator=g)
        lengths = torch.randint(1, max_len + 1, (batch_size,), generator=g)
        pad = torch.arange(max_len)[None, :] >= lengths[:, None]
        labels[pad] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


class ListLoader:
    """A sized, resumable iterable of ready-made batches (Lightning restores its position mid-epoch)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self._start = 0
        self._consumed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._start = self._start, 0
        self._consumed = start
        for b in self.batches[start:]:
            self._consumed += 1
            yield b

    def state_dict(self) -> dict:
        return {"consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._start = state["consumed"]


def reference_sgd(net: torch.nn.Module, windows: list[list[dict]], *, lr: float, normalize: str,
                  dp_groups: list[list[list[dict]]] | None = None, clip: float | None = None
                  ) -> dict[str, torch.Tensor]:
    """Float64 plain-torch SGD over ``windows`` (lists of micro-batches), written from the definitions.

    ``normalize="tokens"``: grad = d(sum of token losses over the window) / (valid tokens in the window).
    ``normalize="mean"``: grad = mean over micro-batches of the per-micro-batch mean-loss gradient; with
    ``dp_groups`` (per window, per rank, its micro-batches) the mean over ranks of each rank's micro-batch mean.
    ``clip``: the gradient's global L2 norm is clipped to it before the step.
    """
    net = copy.deepcopy(net).double()
    params = list(net.parameters())
    for w, window in enumerate(windows):
        for p in params:
            p.grad = None
        if normalize == "tokens":
            total = sum(int((b["labels"] != IGNORE).sum()) for b in window)
            loss = sum(token_loss(net, b)[0] for b in window) / max(total, 1)
        elif dp_groups is not None:
            ranks = dp_groups[w]
            loss = sum(sum(_mean_loss(net, b) for b in mbs) / len(mbs) for mbs in ranks) / len(ranks)
        else:
            loss = sum(_mean_loss(net, b) for b in window) / len(window)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
    return {k: v.float() for k, v in net.state_dict().items()}


def _mean_loss(net: torch.nn.Module, b: dict) -> torch.Tensor:
    s, n = token_loss(net, b)
    return s / n.clamp_min(1)


def naive_sgd(net: torch.nn.Module, windows: list[list[dict]], *, lr: float) -> dict[str, torch.Tensor]:
    """The 2024 bug: mean over micro-batches of per-micro-batch token means."""
    return reference_sgd(net, windows, lr=lr, normalize="mean")
