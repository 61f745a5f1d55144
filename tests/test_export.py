"""``effi export`` files rebuild their network: ``GPT.from_export`` / ``BertEncoder.from_export`` / ``load_export``
give the logits of the trained LightningModule's own forward, from every checkpoint layout and ``strip_prefix``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_effi.export import FORMAT, FORMAT_VERSION, SPEC_KEY, export_checkpoint, load_export, model_spec
from lightning_effi.models import GPT, BertEncoder, BertMLMLightningModule, GPTLightningModule

TINY = {"vocab_size": 260, "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.0}


@dataclass(frozen=True)
class Case:
    module: type[pl.LightningModule]
    model: type[nn.Module]
    class_path: str


CASES = {
    "gpt": Case(GPTLightningModule, GPT, "lightning_effi.models.gpt.GPT"),
    "bert": Case(BertMLMLightningModule, BertEncoder, "lightning_effi.models.bert.BertEncoder"),
}


def _tokens(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, TINY["block_size"]), generator=torch.Generator().manual_seed(seed))


def _train_one_step(case: Case, tmp_path: Path) -> tuple[pl.LightningModule, Path]:
    """One optimizer step on CPU, then Lightning's own checkpoint file (``trainer.save_checkpoint``)."""
    torch.manual_seed(0)
    module = case.module(**TINY, warmup_steps=0, fused_loss=False)
    ids = _tokens(4, seed=0)
    labels = torch.roll(ids, -1, dims=1) if module.data_task == "causal" else ids
    batches = torch.utils.data.DataLoader([{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)],
                                          batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|no `val_dataloader`).*")
        trainer.fit(module, train_dataloaders=batches)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), ckpt


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def trained(request, tmp_path_factory):
    case = CASES[request.param]
    module, ckpt = _train_one_step(case, tmp_path_factory.mktemp(request.param))
    with torch.no_grad():
        logits = module(_tokens())
    return case, module, ckpt, logits


@pytest.mark.parametrize("strip_prefix", [None, "model.", "model"], ids=["default", "model.", "model"])
def test_from_export_gives_the_modules_logits(trained, strip_prefix, tmp_path):
    case, module, ckpt, logits = trained
    out = export_checkpoint(ckpt, tmp_path / "net.pt", strip_prefix=strip_prefix)
    with torch.no_grad():
        for loaded in (case.model.from_export(out), load_export(out)):
            assert type(loaded) is case.model and not loaded.training
            assert torch.equal(loaded(_tokens()), logits)
            assert torch.equal(loaded(_tokens()), module.model(_tokens()))
    # one step of training moved the weights away from a fresh network's
    assert not torch.equal(case.model(**TINY).wte.weight, case.model.from_export(out).wte.weight)


def test_export_file_is_plain_and_versioned(trained, tmp_path):
    case, module, ckpt, _ = trained
    obj = torch.load(export_checkpoint(ckpt, tmp_path / "net.pt"), weights_only=True)
    assert set(obj) == {"format", "format_version", "state_dict", "model"}
    assert (obj["format"], obj["format_version"]) == (FORMAT, FORMAT_VERSION) == ("lightning_effi.export", 1)
    assert obj["model"] == {"class_path": case.class_path, "init_args": TINY, "prefix": "model."}
    assert set(obj["state_dict"]) == set(module.state_dict())  # the default keeps the LightningModule's keys
    stripped = torch.load(export_checkpoint(ckpt, tmp_path / "s.pt", strip_prefix="model."), weights_only=True)
    assert stripped["model"]["prefix"] == "" and set(stripped["state_dict"]) == set(module.model.state_dict())


def test_checkpoint_written_by_effi_fit_before_export_spec_existed(trained, tmp_path):
    """No ``export_spec`` entry: the module class that LightningCLI records as ``_class_path`` says it."""
    case, _, ckpt, logits = trained
    state = torch.load(ckpt, weights_only=False)
    del state[SPEC_KEY]
    state["hyper_parameters"]["_class_path"] = f"{case.module.__module__}.{case.module.__name__}"
    torch.save(state, tmp_path / "old.ckpt")
    out = export_checkpoint(tmp_path / "old.ckpt", tmp_path / "net.pt")
    with torch.no_grad():
        assert torch.equal(case.model.from_export(out)(_tokens()), logits)


def test_sharded_dcp_checkpoint_records_the_model_in_meta(trained, tmp_path):
    """The layout of Lightning's sharded save (weights in DCP, the rest in meta.pt), written by one process."""
    import torch.distributed.checkpoint as dcp

    case, _, ckpt, logits = trained
    state = torch.load(ckpt, weights_only=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"state_dict": state.pop("state_dict")}, checkpoint_id=tmp_path / "sharded")
    state.pop("optimizer_states")
    torch.save(state, tmp_path / "sharded" / "meta.pt")
    out = export_checkpoint(tmp_path / "sharded", tmp_path / "net.pt")
    with torch.no_grad():
        assert torch.equal(case.model.from_export(out)(_tokens()), logits)


def test_wrong_class_names_both(trained, tmp_path):
    case, _, ckpt, _ = trained
    other = BertEncoder if case.model is GPT else GPT
    out = export_checkpoint(ckpt, tmp_path / "net.pt")
    with pytest.raises(ValueError, match=rf"holds a {case.class_path} export, not a {other.__module__}\."
                                         rf"{other.__name__}; load it with {case.model.__name__}.from_export"):
        other.from_export(out)


def test_bare_state_dict_of_an_earlier_export_says_how_to_load_it(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(**TINY).eval()
    torch.save(gpt.state_dict(), tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"(?s)old\.pt' holds a bare state_dict.*re-export the checkpoint with the "
                                         r"current `effi export CKPT OUT\.pt`, or pass the config explicitly"):
        GPT.from_export(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="holds a bare state_dict"):
        load_export(tmp_path / "old.pt", config=TINY)  # no class to build
    with torch.no_grad():
        assert torch.equal(GPT.from_export(tmp_path / "old.pt", config=TINY)(_tokens()), gpt(_tokens()))


def test_config_replaces_recorded_arguments(trained, tmp_path):
    case, _, ckpt, logits = trained
    out = export_checkpoint(ckpt, tmp_path / "net.pt")
    with torch.no_grad():
        assert torch.equal(case.model.from_export(out, config={"dropout": 0.5})(_tokens()), logits)  # eval mode
    with pytest.raises(ValueError, match=r"(?s)net\.pt' does not fit .*'d_model': 32.*size mismatch"):
        case.model.from_export(out, config={"d_model": 32})


class _NetModule(pl.LightningModule):
    """A module of one's own: the network under ``net.`` and, with ``spec``, the opt-in checkpoint entry."""

    def __init__(self, spec: bool):
        super().__init__()
        self.net = GPT(**TINY)
        self.spec = spec

    def on_save_checkpoint(self, checkpoint):
        if self.spec:
            checkpoint[SPEC_KEY] = model_spec(GPT, TINY, prefix="net.")


def _module_checkpoint(tmp_path: Path, spec: bool) -> tuple[_NetModule, Path]:
    module = _NetModule(spec).eval()
    state = {"state_dict": module.state_dict(), "hyper_parameters": {}}
    module.on_save_checkpoint(state)
    torch.save(state, tmp_path / "own.ckpt")
    return module, tmp_path / "own.ckpt"


def test_own_module_opts_in_with_model_spec(tmp_path):
    module, ckpt = _module_checkpoint(tmp_path, spec=True)
    for strip_prefix in (None, "net."):
        out = export_checkpoint(ckpt, tmp_path / "net.pt", strip_prefix=strip_prefix)
        with torch.no_grad():
            assert torch.equal(load_export(out)(_tokens()), module.net(_tokens()))


def test_export_without_a_recorded_model_needs_the_config(tmp_path):
    module, ckpt = _module_checkpoint(tmp_path, spec=False)
    out = export_checkpoint(ckpt, tmp_path / "net.pt", strip_prefix="net.")
    assert torch.load(out, weights_only=True)["model"] is None
    with pytest.raises(ValueError, match=r"net\.pt' holds no model class and config.*re-export"):
        GPT.from_export(out)
    with torch.no_grad():
        assert torch.equal(GPT.from_export(out, config=TINY)(_tokens()), module.net(_tokens()))


def test_strip_prefix_inside_the_network_warns_and_records_no_model(trained, tmp_path):
    _, _, ckpt, _ = trained
    with pytest.warns(UserWarning, match=r"strip_prefix 'model\.blocks\.' does not contain the network .* use "
                                         r"strip_prefix=None or 'model\.'"):
        out = export_checkpoint(ckpt, tmp_path / "part.pt", strip_prefix="model.blocks")
    obj = torch.load(out, weights_only=True)
    assert obj["model"] is None and all(k.startswith("0.") for k in obj["state_dict"])


def test_unknown_module_class_warns_and_bad_spec_entry_raises(tmp_path):
    sd = GPT(**TINY).state_dict()
    torch.save({"state_dict": sd, "hyper_parameters": {"_class_path": "nowhere.Module"}}, tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match=r"module class 'nowhere.Module' cannot be imported .* holds no model class"):
        out = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "a.pt")
    assert torch.load(out, weights_only=True)["model"] is None
    torch.save({"state_dict": sd, SPEC_KEY: {"class_path": "x.Net"}}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"Invalid checkpoint entry 'export_spec' .*: must be model_spec"):
        export_checkpoint(tmp_path / "b.ckpt", tmp_path / "b.pt")


def _write(tmp_path: Path, obj) -> Path:
    torch.save(obj, tmp_path / "x.pt")
    return tmp_path / "x.pt"


@pytest.mark.parametrize(("obj", "exc", "message"), [
    ({"weights": 1}, ValueError, r"x\.pt' is not an `effi export` file \(no 'format'"),
    ({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "state_dict": {}, "model": None}, ValueError,
     r"format_version 2; this version of lightning_effi reads up to 1: upgrade"),
    ({"format": FORMAT, "format_version": 1, "state_dict": {},
      "model": {"class_path": "collections.OrderedDict", "init_args": {}, "prefix": ""}}, TypeError,
     r"records class_path 'collections.OrderedDict', which is not an nn.Module subclass"),
], ids=["no-format", "newer-version", "not-a-module"])
def test_load_errors(obj, exc, message, tmp_path):
    with pytest.raises(exc, match=message):
        load_export(_write(tmp_path, obj))


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "bad.pt").write_text("garbage\n")
    with pytest.raises(ValueError, match=r"bad\.pt' could not be read as an `effi export` file"):
        load_export(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt' does not exist"):
        GPT.from_export(tmp_path / "nope.pt")


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"init_args": {"norm": nn.LayerNorm}}, TypeError, r"init_args\['norm'\] .* of lightning_effi.models.gpt.GPT: "
                                                       r"must be a bool, int, float, str, None"),
    ({"init_args": {}, "prefix": "model"}, ValueError, r"Invalid prefix 'model': must be empty or end with '.'"),
], ids=["not-plain", "prefix-dot"])
def test_model_spec_errors(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        model_spec(GPT, **kwargs)
