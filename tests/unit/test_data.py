import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets import MNIST
from torchvision.transforms.functional import to_tensor

from rnnddp.data.batches import Split, TrainBatches, eval_batches
from rnnddp.data.mnist import MNIST_FILES, load_dataset, locate_dataset
from rnnddp.data.views import ImageView
from rnnddp.errors import UserError


@pytest.fixture(scope="module")
def splits(mnist_root):
    return load_dataset("mnist", locate_dataset("mnist", str(mnist_root), download=False))


def test_real_mnist_shapes_and_range(splits):
    train, test = splits
    assert train.inputs.shape == (60000, 28, 28) and train.inputs.dtype == torch.uint8
    assert test.inputs.shape == (10000, 28, 28)
    assert set(train.targets.unique().tolist()) == set(range(10))
    cpu = torch.device("cpu")
    batches = TrainBatches(train, global_batch_size=64, rank=0, world_size=1, seed=0, device=cpu, transform=ImageView())
    x, y = next(batches.epoch(0))
    assert x.shape == (64, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.99


def test_fast_path_matches_sampler_order_and_totensor(splits, mnist_root):
    # The in-memory loader yields exactly the sampler's indices, with ToTensor()'s values.
    train, _ = splits
    batches = TrainBatches(
        train, global_batch_size=32, rank=1, world_size=2, seed=3, device=torch.device("cpu"), transform=ImageView()
    )
    batches.sampler.set_epoch(2)
    expected = list(batches.sampler)[:16]
    assert batches.indices(2)[0].tolist() == expected
    x, y = next(batches.epoch(2))
    reference = MNIST(str(locate_dataset("mnist", str(mnist_root), download=False)), train=True)
    for row, i in enumerate(expected[:4]):
        img, label = reference[i]
        assert torch.equal(x[row], to_tensor(img)[0])  # rows of 28 pixels = the image itself
        assert y[row].item() == label


def _fake(n: int) -> Split:
    return Split(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n) % 10)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_are_disjoint_cover_the_epoch_and_match_one_process(world):
    split = _fake(1000)
    B = 12 * world
    shards = [
        TrainBatches(split, global_batch_size=B, rank=r, world_size=world, seed=5, device=torch.device("cpu")).indices(
            0
        )
        for r in range(world)
    ]
    flat = torch.cat([s.flatten() for s in shards])
    assert len(set(flat.tolist())) == len(flat) == (1000 // B) * B  # disjoint, every full batch used
    single = TrainBatches(split, global_batch_size=B, rank=0, world_size=1, seed=5, device=torch.device("cpu")).indices(
        0
    )
    for step in range(single.shape[0]):
        # Global batch s holds the same samples whatever the world size.
        together = torch.cat([s[step] for s in shards])
        assert sorted(together.tolist()) == sorted(single[step].tolist())


def test_reshuffled_every_epoch_and_resume_skips_consumed_batches():
    split = _fake(640)
    tb = TrainBatches(split, global_batch_size=64, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    e0, e1 = tb.indices(0), tb.indices(1)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, tb.indices(0))  # a function of (seed, epoch) only
    labels = [y for _, y in tb.epoch(1, start_step=3)]
    assert len(labels) == 7
    assert torch.equal(labels[0], split.targets[e1[3]])


def test_global_batch_must_divide_world_size():
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        TrainBatches(_fake(100), global_batch_size=64, rank=0, world_size=3, seed=0, device=torch.device("cpu"))


def test_test_set_is_covered_exactly_once():
    split = _fake(2500)
    ys = torch.cat([y for _, y in eval_batches(split, 1000, torch.device("cpu"))])
    assert torch.equal(ys, split.targets)


def test_gz_only_folder_is_extracted_into_the_cache(tmp_path: Path, mnist_root):
    # A read-only folder of .gz files, like ../shared/data/MNIST/raw in CI.
    src = tmp_path / "ro" / "MNIST" / "raw"
    src.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(mnist_root / "MNIST" / "raw" / (name + ".gz"), src / (name + ".gz"))
    os.chmod(src, 0o555)
    try:
        found = locate_dataset("mnist", str(tmp_path / "ro"), cache_dir=str(tmp_path / "cache"), download=False)
        assert found == tmp_path / "cache"
        train, test = load_dataset("mnist", found)
        assert len(train) == 60000 and len(test) == 10000
        assert sorted(os.listdir(src)) == sorted(n + ".gz" for n in MNIST_FILES)  # source untouched
    finally:
        os.chmod(src, 0o755)


def test_corrupt_gz_is_named(tmp_path: Path, mnist_root):
    src = tmp_path / "MNIST" / "raw"
    src.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(mnist_root / "MNIST" / "raw" / (name + ".gz"), src / (name + ".gz"))
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not mnist")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
        locate_dataset("mnist", str(tmp_path), cache_dir=str(tmp_path / "cache"), download=False)
    assert not (tmp_path / "cache" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()


def test_missing_data_without_network_is_one_line(tmp_path: Path, monkeypatch):
    # A mirror that refuses connections stands in for "no network" on any machine.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError) as e:
        locate_dataset("mnist", str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"), download=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "empty" / "MNIST" / "raw") in msg and "download failed" in msg and "data.root" in msg
    with pytest.raises(UserError, match="MNIST not found in .*data.download=true"):
        locate_dataset("mnist", str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"), download=False)
