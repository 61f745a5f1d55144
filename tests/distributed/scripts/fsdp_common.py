"""Model, data, optimizers and cases shared by the EffiFSDPStrategy scripts and their tests.

The network is the package's GPT plus a 1-element ``gain`` (its shard is empty on rank 1 of 2) and an odd vocabulary
(67 rows: shards of 34 and 33 rows), so uneven and empty shards are exercised. :func:`reference_run` is the
independent reference: a plain single-process PyTorch loop over the whole global batch, no Lightning, no sharding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, BLOCK, N_SAMPLES, GLOBAL_BATCH, SEED = 67, 16, 40, 8, 1234
PER_EPOCH = N_SAMPLES // GLOBAL_BATCH  # 5 global batches per epoch
EPOCHS = 2
SAVE_AT = PER_EPOCH  # the step-5 checkpoint is an end-of-epoch checkpoint
SIGTERM_AFTER = 2  # the sigterm case: rank 0 is signalled after batch 2, so every rank stops with 3 steps done

# One window per optimizer step: the global batches (indices into an epoch) whose mean gradient it applies.
PLAIN_WINDOWS = [[i] for i in range(PER_EPOCH)] * EPOCHS
# AccumulationScheduler({0: 1, 2: 2}): factor 2 from step 2; the last window of an epoch is cut short at its end.
SCHEDULED_WINDOWS = [[0], [1], [2, 3], [4], [0, 1], [2, 3], [4]]
SKIP_AT = 3  # the fp16 case injects an overflow on rank 1 only, in this optimizer step

# Per case: optimizer, how the run differs, and the windows/skips the reference replays.
CASES: dict[str, dict] = {
    "adamw": {"optimizer": "adamw"},
    "lamb": {"optimizer": "lamb", "health": True},
    "adamw_accum": {"optimizer": "adamw", "accumulate": 2},  # micro-batch halved, same global batch per step
    # activation checkpointing per Block inside one two-Block unit
    "adamw_ac": {"optimizer": "adamw",
                 "strategy": {"activation_checkpointing": ["Block"], "reshard_after_forward": False,
                              "wrap_group_size": 2}},
    "adamw_bf16": {"optimizer": "adamw", "precision": "bf16-mixed"},
    "adamw_fp16": {"optimizer": "adamw", "fp16": True, "skip": [SKIP_AT], "health": True},
    "lamb_sched": {"optimizer": "lamb", "schedule": {0: 1, 2: 2}, "windows": SCHEDULED_WINDOWS},
    # Per-block torch.compile. On CPU fsdp_train.py compiles with backend="aot_eager" (inductor's C++ build takes
    # minutes on 2 cores): Dynamo capture and AOTAutograd's joint graph are still exercised; GPUs use inductor.
    "adamw_compile": {"optimizer": "adamw", "strategy": {"compile": True}},
    # torch's fused AdamW kernel on the local shards (the default) and through DTensor's dispatcher: bitwise equal
    "adamw_fused": {"optimizer": "adamw_fused"},
    "adamw_fused_dtensor": {"optimizer": "adamw_fused", "strategy": {"fused_adam_on_local_shards": False}},
    # both Blocks sharded as one FSDP unit (one all-gather / reduce-scatter for the pair), compiled per Block
    "lamb_group2": {"optimizer": "lamb", "strategy": {"wrap_group_size": 2, "compile": True}},
    # a parameter registered on the LightningModule itself (the module becomes the FSDP root unit)
    "adamw_root_param": {"optimizer": "adamw", "root_param": True},
}
# GPUs only (the multi_gpu tests run them).
EXTRA_CASES: dict[str, dict] = {
    # CPU offload exists on GPUs only; clipping and LAMB's norms then reduce CPU tensors (gloo next to NCCL)
    "adamw_offload": {"optimizer": "adamw", "strategy": {"cpu_offload": True}},
    "lamb_offload": {"optimizer": "lamb", "strategy": {"cpu_offload": True}},
}
ALL_CASES = {**CASES, **EXTRA_CASES}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from lightning_effi.models import GPT

        self.gpt = GPT(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, d_model=32, dropout=0.0)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx) * self.gain


def build_net() -> Net:
    torch.manual_seed(SEED)
    return Net()


TEMPERATURE = 0.9  # initial value of the root_param case's parameter


class WithRootParam(nn.Module):
    """The root_param case's reference: the LightningModule's own parameter next to ``net``, same names."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()
        self.temperature = nn.Parameter(torch.full((1,), TEMPERATURE))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx) * self.temperature


def initial_state(case: str) -> dict[str, torch.Tensor]:
    """The weights every run of ``case`` starts from, keyed as the runs save them (``net.`` prefix dropped)."""
    if ALL_CASES[case].get("root_param"):
        return {k.removeprefix("net."): v for k, v in WithRootParam().state_dict().items()}
    return build_net().state_dict()


def dataset() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (N_SAMPLES, BLOCK + 1), generator=g)


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


# "clip" is Trainer(gradient_clip_val=...) (Lightning calls torch.nn.utils.clip_grad_norm_ on the DTensor grads);
# Lamb clips inside with max_grad_norm. Both are small enough to be active in every step. no_decay/no_adapt
# exercise the group exclusions. eps=1e-6: the attention key bias has an exactly-zero true gradient, and a smaller
# eps lets Adam amplify its rounding noise into lr-sized steps that differ between any two summation orders.
OPTIMIZERS = {
    "adamw": {"clip": 0.05, "no_decay": ["bias", "norm"], "no_adapt": []},
    "lamb": {"clip": None, "no_decay": ["bias", "norm"], "no_adapt": ["1d"]},
    "adamw_fused": {"clip": 0.05, "no_decay": ["bias", "norm"], "no_adapt": []},  # AdamW(fused=True)
}


def make_optimizer(name: str, module: nn.Module):
    from lightning_effi.optim import param_groups

    spec = OPTIMIZERS[name]
    groups = param_groups(module, weight_decay=0.1, no_decay=spec["no_decay"], no_adapt=spec["no_adapt"])
    if name in ("adamw", "adamw_fused"):
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, fused=name == "adamw_fused")
    else:
        from lightning_effi.optim import Lamb

        opt = Lamb(groups, lr=2e-2, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))  # warmup: its state must resume
    return opt, sched


def reference_run(case: str, *, steps: int | None = None, logits_after: int | None = None, stats: dict | None = None):
    """Plain single-process training of ``case``; returns the final ``state_dict`` and optionally the logits of
    ``Net.gpt`` on the first 4 samples after ``logits_after`` steps. ``stats`` (a dict) receives the last step's
    gradient norm before clipping and, for LAMB, its trust ratios."""
    spec = ALL_CASES[case]
    windows = spec.get("windows", PLAIN_WINDOWS)[:steps]
    net: nn.Module = WithRootParam() if spec.get("root_param") else build_net()
    data = dataset()
    opt, sched = make_optimizer(spec["optimizer"], net)
    clip = OPTIMIZERS[spec["optimizer"]]["clip"]
    logits = None
    for step, window in enumerate(windows):
        opt.zero_grad(set_to_none=True)
        batch = torch.cat([data[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH] for i in window])
        loss_fn(net(batch[:, :-1]), batch).backward()
        if stats is not None:
            stats["grad_norm"] = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])))
        if step not in spec.get("skip", ()):  # a skipped step changes neither weights nor the LR schedule
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            sched.step()
        if logits_after is not None and step + 1 == logits_after:
            with torch.no_grad():
                logits = build_net_view(net)(data[:4, :-1]).clone()
    if stats is not None and getattr(opt, "trust_ratios", None) is not None:
        stats["trust_ratios"] = opt.trust_ratios.clone()
    return {k.removeprefix("net."): v.detach().clone() for k, v in net.state_dict().items()}, logits


def build_net_view(net: nn.Module) -> nn.Module:
    """The GPT inside ``net`` (a Net, or the root_param wrapper around one)."""
    return net.net.gpt if isinstance(net, WithRootParam) else net.gpt


def max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest ``max|a-b| / max|b|`` over tensors, and which tensor it was."""
    if a.keys() != b.keys():
        raise AssertionError(f"different keys: {sorted(set(a) ^ set(b))}")
    worst, where = 0.0, ""
    for k in a:
        x, y = a[k].double(), b[k].double()
        d = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        if not d <= worst:  # also catches nan
            worst, where = d, k
    return worst, where


def case_dir(root: str | Path, case: str) -> Path:
    return Path(root) / case
