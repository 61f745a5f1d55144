"""Models, data, optimizers and cases shared by the tensor-parallel script (tp_train.py) and its tests.

Two networks: the package's ``GPT`` (tensor-parallel through ``GPTLightningModule.tp_plan``, the shipped default) and
``Llama``, a small transformer written here with separate q/k/v/o and gate/up/down projections, RMSNorm, no biases
and a head count read from an attribute, parallelized by a plan written as YAML (:data:`LLAMA_PLAN`). The reference
(:func:`reference_run`) is a plain single-process loop over the whole global batch: no Lightning, no DTensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

VOCAB, BLOCK, N_SAMPLES, GLOBAL_BATCH, SEED = 64, 16, 20, 4, 4321
PER_EPOCH = N_SAMPLES // GLOBAL_BATCH  # 5 optimizer steps per epoch
EPOCHS = 2
SKIP_AT = 2  # fp16 case: rank 1 alone writes an inf into its local gradient shards in this optimizer step

# What tp_plan looks like in a LightningCLI YAML (paths relative to the LightningModule, '*' one path segment).
LLAMA_PLAN = yaml.safe_load("""
net.tok: embedding
net.layers.0: sequence_split
net.layers.*.attn_norm: sequence
net.layers.*.mlp_norm: sequence
net.layers.*.attn.q: colwise
net.layers.*.attn.k: colwise
net.layers.*.attn.v: colwise
net.layers.*.attn.o: rowwise
net.layers.*.attn.n_heads: divide
net.layers.*.mlp.gate: colwise
net.layers.*.mlp.up: colwise
net.layers.*.mlp.down: rowwise
net.norm: sequence
net.head: output
""")

# Per case: network, optimizer, (data parallel, tensor parallel) layout and strategy switches.
CASES: dict[str, dict] = {
    "gpt_adamw": {"net": "gpt", "optimizer": "adamw"},
    "gpt_adamw_sp": {"net": "gpt", "optimizer": "adamw", "sp": True, "clip": 0.05},
    "gpt_adamw_sp_lp": {"net": "gpt", "optimizer": "adamw", "sp": True, "lp": True},
    "gpt_lamb_sp_lp": {"net": "gpt", "optimizer": "lamb", "sp": True, "lp": True, "health": True},
    "llama_adamw_sp": {"net": "llama", "optimizer": "adamw", "sp": True},
    "llama_lamb_lp": {"net": "llama", "optimizer": "lamb", "lp": True},
    # checkpoint sources for the layout changes (two epochs, a DCP checkpoint at the end of the first)
    "gpt_adamw_dp2": {"net": "gpt", "optimizer": "adamw", "layout": (2, 1), "save": True},
    "gpt_adamw_tp2": {"net": "gpt", "optimizer": "adamw", "sp": True, "layout": (1, 2), "save": True},
}
CASES_4: dict[str, dict] = {  # 4 ranks: data parallel 2 x tensor parallel 2
    # Trainer(gradient_clip_val=...): Lightning's clipping over gradients on two meshes
    "2d_adamw": {"net": "gpt", "optimizer": "adamw", "sp": True, "lp": True, "layout": (2, 2), "clip": 0.05},
    "2d_lamb": {"net": "llama", "optimizer": "lamb", "sp": True, "layout": (2, 2), "health": True},
    "2d_fp16": {"net": "gpt", "optimizer": "adamw", "sp": True, "layout": (2, 2), "fp16": True,
                "skip": [SKIP_AT], "health": True},
}
ALL_CASES = {**CASES, **CASES_4}


def layout(case: str) -> tuple[int, int]:
    return ALL_CASES[case].get("layout", (1, 2))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, n_heads)
        self.mlp_norm, self.mlp = RMSNorm(dim), SwiGLU(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, dim: int = 32, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(Layer(dim, n_heads) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build_net(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    if name == "llama":
        return Llama()
    from lightning_effi.models import GPT

    return GPT(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, d_model=32)


def dataset() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (N_SAMPLES, BLOCK + 1), generator=g)


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # Plain F.cross_entropy: on a vocabulary-sharded logits DTensor inside loss_parallel() it is torch's parallel
    # cross-entropy.
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


# Lamb: max_grad_norm small enough to clip every step, decay/adaptation exclusions; eps=1e-6 keeps Adam from turning
# the rounding noise of gradients that are exactly zero in exact arithmetic into lr-sized steps.
def make_optimizer(name: str, module: nn.Module):
    from lightning_effi.optim import Lamb, param_groups

    if name == "adamw":
        groups = param_groups(module, weight_decay=0.1, no_decay=["bias", "norm"])
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    else:
        groups = param_groups(module, weight_decay=0.1, no_decay=["bias", "norm"], no_adapt=["1d"])
        opt = Lamb(groups, lr=2e-2, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return opt, sched


def batch(step: int, data: torch.Tensor) -> torch.Tensor:
    """The global batch of optimizer step ``step`` (epochs repeat the same 5 batches in order)."""
    i = step % PER_EPOCH
    return data[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]


def reference_run(case: str, stats: dict | None = None) -> dict[str, torch.Tensor]:
    spec = ALL_CASES[case]
    net = build_net(spec["net"])
    data = dataset()
    opt, sched = make_optimizer(spec["optimizer"], net)
    steps = PER_EPOCH * (EPOCHS if spec.get("save") else 1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        b = batch(step, data)
        loss_fn(net(b[:, :-1]), b).backward()
        if stats is not None:
            stats["grad_norm"] = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])))
        if step not in spec.get("skip", ()):
            if spec.get("clip"):
                torch.nn.utils.clip_grad_norm_(net.parameters(), spec["clip"])
            opt.step()
            sched.step()
    if stats is not None and getattr(opt, "trust_ratios", None) is not None:
        stats["trust_ratios"] = opt.trust_ratios.clone()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def rel_to_movement(got: dict, ref: dict, net: str) -> float:
    """||w - w_ref|| / ||w_ref - w_init|| over all tensors: the error relative to how far training moved."""
    init = build_net(net).state_dict()
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float(((init[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    return (num / den) ** 0.5


def case_dir(root: str | Path, case: str) -> Path:
    return Path(root) / case
