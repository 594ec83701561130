"""MNIST as sequences of rows, held in memory as tensors and batched by indexing.

The training order comes from ``DistributedSampler`` (a function of seed and epoch only), and
rank r takes every world_size-th index of it. So global batch s is always
``order[s*B:(s+1)*B]`` whatever the world size: the same config optimises the same way on 1
or N ranks. An epoch has ``len(train) // B`` steps; the few samples past the last full
global batch are skipped that epoch and land elsewhere in the next shuffle.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from rnnddp.errors import UserError

MNIST_FILES = {  # uncompressed name -> md5 of the uncompressed file
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "rnnddp"


def _has_raw(folder: Path, suffix: str = "") -> bool:
    return all((folder / (name + suffix)).is_file() for name in MNIST_FILES)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(gz_dir: Path, cache_root: Path) -> Path:
    """Decompress the four .gz files into cache_root/MNIST/raw (atomically, checked by md5)."""
    raw = cache_root / "MNIST" / "raw"
    if _has_raw(raw):
        return cache_root
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name, md5 in MNIST_FILES.items():
            target = raw / name
            if target.is_file():
                continue
            # Unique temp name + rename: ranks or jobs extracting at once never see a partial file.
            fd, tmp = tempfile.mkstemp(dir=raw, prefix=name + ".")
            with os.fdopen(fd, "wb") as out, gzip.open(gz_dir / (name + ".gz"), "rb") as src:
                shutil.copyfileobj(src, out)
            if _md5(Path(tmp)) != md5:
                os.unlink(tmp)
                raise UserError(f"{gz_dir / (name + '.gz')} is corrupt (md5 mismatch); replace it with a good copy")
            os.replace(tmp, target)
    except OSError as e:
        raise UserError(
            f"cannot extract MNIST into {raw} ({e.strerror}); set data.cache_dir to a writable folder"
        ) from None
    return cache_root


def locate_mnist(root: str, cache_dir: str = "", download: bool = True) -> Path:
    """Return a folder R such that R/MNIST/raw holds the four uncompressed IDX files.

    Looks in ``root/MNIST/raw``, then for .gz files there (or directly in root, or root/raw),
    which are extracted into the cache; else downloads into root when allowed.
    """
    root_p = Path(root).expanduser()
    if _has_raw(root_p / "MNIST" / "raw"):
        return root_p
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    for gz_dir in (root_p / "MNIST" / "raw", root_p / "raw", root_p):
        if _has_raw(gz_dir, ".gz"):
            return _extract(gz_dir, cache)
    looked = f"{root_p / 'MNIST' / 'raw'} (IDX or .gz files)"
    if not download:
        raise UserError(f"MNIST not found in {looked}; copy the four IDX files there or set data.download=true")
    try:
        from torchvision.datasets import MNIST

        MNIST(str(root_p), train=True, download=True)
        MNIST(str(root_p), train=False, download=True)
    except Exception as e:  # no network, DNS failure, HTTP error, unwritable root
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"MNIST not found in {looked} and the download failed ({reason[:120]}); "
            "set data.root to a folder holding MNIST/raw, or run once with network access"
        ) from None
    return root_p


def load_mnist(root: Path) -> tuple[Split, Split]:
    """Both splits as in-memory uint8 image and int64 label tensors (read through torchvision)."""
    from torchvision.datasets import MNIST

    train = MNIST(str(root), train=True)
    test = MNIST(str(root), train=False)
    return Split(train.data, train.targets), Split(test.data, test.targets)


def to_sequences(images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 28 steps, 28 features] in [0, 1] (or standardised).

    Same values as torchvision's ToTensor() (x / 255), done per batch on the batch's device.
    """
    x = images.float().div_(255.0)
    if normalize:
        x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return x


class TrainBatches:
    """Per-rank training batches in the DistributedSampler's order, by tensor indexing."""

    def __init__(
        self,
        split: Split,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        normalize: bool = False,
    ) -> None:
        if global_batch_size % world_size:
            raise UserError(
                f"train.global_batch_size={global_batch_size} is not divisible by the world size "
                f"{world_size}; pick a multiple of {world_size}"
            )
        if global_batch_size > len(split):
            raise UserError(
                f"train.global_batch_size={global_batch_size} is larger than the training set ({len(split)})"
            )
        self.split = split
        self.local_batch = global_batch_size // world_size
        self.steps_per_epoch = len(split) // global_batch_size
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.device = device
        self.normalize = normalize
        self._pin = device.type == "cuda" and split.images.device.type == "cpu"

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for the epoch, shape [steps_per_epoch, local_batch]."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.long)
        n = self.steps_per_epoch * self.local_batch
        return idx[:n].view(self.steps_per_epoch, self.local_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the epoch from ``start_step`` on (resume skips what was consumed)."""
        idx = self.indices(epoch).to(self.split.images.device)
        for step in range(start_step, self.steps_per_epoch):
            i = idx[step]
            images, labels = self.split.images[i], self.split.labels[i]
            if self._pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield to_sequences(images, self.normalize), labels


def eval_batches(
    split: Split, batch_size: int, device: torch.device, normalize: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test set in order, every sample exactly once (last batch may be short)."""
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
        yield to_sequences(images, normalize), labels
