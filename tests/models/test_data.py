import pytest
import torch

from lightning_effi.models import CorpusDataModule
from lightning_effi.models.data import EOS_ID, stdlib_files

SMALL = {"max_bytes": 300_000, "block_size": 64, "batch_size": 4, "val_fraction": 0.1}


@pytest.fixture(scope="module")
def stdlib_dm():
    dm = CorpusDataModule(**SMALL)
    dm.setup("fit")
    return dm


def test_stdlib_corpus_is_deterministic(stdlib_dm):
    other = CorpusDataModule(**SMALL)
    other.setup("fit")
    assert other.files == stdlib_dm.files
    assert torch.equal(other.train_tokens, stdlib_dm.train_tokens)
    assert torch.equal(other.val_tokens, stdlib_dm.val_tokens)


def test_split_is_by_file_and_disjoint(stdlib_dm):
    tr, va = set(stdlib_dm.files["train"]), set(stdlib_dm.files["val"])
    assert tr and va and not tr & va
    assert all(f.endswith(".py") and "site-packages" not in f and "/test/" not in f"/{f}" for f in tr | va)
    # documents are joined with EOS: one separator per file
    assert int((stdlib_dm.train_tokens == EOS_ID).sum()) == len(tr)
    assert int((stdlib_dm.val_tokens == EOS_ID).sum()) == len(va)


def test_selection_is_a_stable_order_of_the_stdlib():
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 100
    assert len(set(files)) == len(files)


def test_blocks_are_shifted_windows(stdlib_dm):
    ds = stdlib_dm.train_set
    T = 64
    for i in (0, 5, len(ds) - 1):
        item = ds[i]
        stream = stdlib_dm.train_tokens.long()
        assert torch.equal(item["input_ids"], stream[i * T:(i + 1) * T])
        assert torch.equal(item["labels"], stream[i * T + 1:(i + 1) * T + 1])
    assert len(ds) == (len(stdlib_dm.train_tokens) - 1) // T


def test_mlm_blocks_are_unshifted():
    dm = CorpusDataModule(**SMALL, task="mlm")
    dm.setup()
    item = dm.train_set[3]
    assert torch.equal(item["input_ids"], item["labels"])
    assert torch.equal(item["input_ids"], dm.train_tokens[3 * 64:4 * 64].long())


def _first_batch(dm):
    return next(iter(dm.train_dataloader()))["input_ids"]


def test_shuffle_deterministic_by_seed(stdlib_dm):
    a = _first_batch(stdlib_dm)
    assert torch.equal(a, _first_batch(stdlib_dm))  # same seed, same order, every epoch start
    other = CorpusDataModule(**{**SMALL, "seed": 99})
    other.setup()
    assert not torch.equal(a, _first_batch(other))


def test_unigram_entropy_matches_direct_count(stdlib_dm):
    t = stdlib_dm.train_tokens.long()
    counts = torch.bincount(t).double()
    p = counts[counts > 0] / len(t)
    assert stdlib_dm.unigram_entropy() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)
    assert 2.0 < stdlib_dm.unigram_entropy() < 5.5  # bytes of Python source: a few nats


def test_user_file_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello world " * 200)
    dm = CorpusDataModule(path=str(f), block_size=16, batch_size=2, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_tokens) + len(dm.val_tokens) == 2400 + 2  # + one EOS per split
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):
        (folder / f"d{i}.txt").write_text(f"document {i} " * 50)
    dm = CorpusDataModule(path=str(folder), block_size=16, val_fraction=0.3, pattern="*.txt")
    dm.setup()
    assert set(dm.files["train"]).isdisjoint(dm.files["val"])
    assert len(dm.files["train"]) + len(dm.files["val"]) == 20


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"path": "/nonexistent/corpus.txt"}, FileNotFoundError, "path '/nonexistent/corpus.txt' does not exist"),
        ({"block_size": 0}, ValueError, "block_size 0"),
        ({"batch_size": -2}, ValueError, "batch_size -2"),
        ({"max_bytes": 0}, ValueError, "max_bytes 0"),
        ({"val_fraction": 1.5}, ValueError, "val_fraction 1.5"),
        ({"task": "seq2seq"}, ValueError, "task 'seq2seq'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CorpusDataModule(**kwargs)


def test_empty_folder_and_too_large_block(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no file matching"):
        CorpusDataModule(path=str(empty)).setup()
    f = tmp_path / "tiny.txt"
    f.write_text("x" * 100)
    with pytest.raises(ValueError, match="block_size 512 is larger than the train split, which has 96 tokens"):
        CorpusDataModule(path=str(f), block_size=512).setup()
