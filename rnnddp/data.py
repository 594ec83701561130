"""MNIST-style data sets as sequences, held in memory as uint8 tensors and batched by indexing.

``data.dataset`` picks MNIST, Fashion-MNIST or KMNIST (the same 28x28 IDX layout); ``data.view``
turns each batch into a sequence (rows, columns, pixels, or pixels in one fixed permuted order)
on the batch's device, so the in-memory tensors stay uint8 images whatever the view.

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


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # root/<folder>/raw, and the torchvision class of the same name
    md5: dict[str, str] | None  # of the uncompressed IDX files, where known
    mean: float  # training-set pixel mean and std after scaling to [0, 1] (data.normalize)
    std: float


# All three use MNIST's four file names and IDX layout. torchvision only knows the md5s of the
# other two's .gz files, so their extracted files are checked by IDX header and size instead.
DATASETS = {
    "mnist": DatasetInfo("MNIST", MNIST_FILES, MNIST_MEAN, MNIST_STD),
    "fashion_mnist": DatasetInfo("FashionMNIST", None, 0.2860, 0.3530),
    "kmnist": DatasetInfo("KMNIST", None, 0.1918, 0.3483),
}
VIEWS = ("rows", "columns", "pixels", "permuted_pixels")
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


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


def _idx_problem(path: Path) -> str | None:
    """None when ``path`` is a well-formed IDX file of 28x28 uint8 images or of uint8 labels."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if len(head) < 8:
        return "too short for an IDX header"
    magic, n = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
    if "images" in path.name:
        if magic != IDX_MAGIC["images"] or len(head) < 16:
            return f"not an IDX image file (magic {magic:#010x})"
        rows, cols = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
        if (rows, cols) != (28, 28) or size != 16 + n * 784:
            return f"expected {n} images of 28x28 ({16 + n * 784} bytes), found {rows}x{cols} and {size} bytes"
    elif magic != IDX_MAGIC["labels"] or size != 8 + n:
        return f"not an IDX label file of {n} labels (magic {magic:#010x}, {size} bytes)"
    return None


def _extract(gz_dir: Path, cache_root: Path, dataset: str = "mnist") -> Path:
    """Decompress the four .gz files into cache_root/<Folder>/raw (atomically, checked by md5 or IDX header)."""
    info = DATASETS[dataset]
    raw = cache_root / info.folder / "raw"
    if _has_raw(raw):
        return cache_root
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            target = raw / name
            if target.is_file():
                continue
            # Unique temp name + rename: ranks or jobs extracting at once never see a partial file.
            fd, tmp = tempfile.mkstemp(dir=raw, prefix=name + ".")
            try:
                with os.fdopen(fd, "wb") as out, gzip.open(gz_dir / (name + ".gz"), "rb") as src:
                    shutil.copyfileobj(src, out)
            except BaseException:
                os.unlink(tmp)  # a damaged .gz or a full disk leaves no partial file in the cache
                raise
            digest = _md5(Path(tmp))
            if info.md5 is not None:
                problem = "md5 mismatch" if digest != info.md5[name] else None
            elif digest == MNIST_FILES[name]:  # e.g. data.root pointing at MNIST's own .gz folder
                problem = f"it is MNIST's file, not {info.folder}'s"
            else:
                problem = _idx_problem(Path(tmp))
            if problem:
                os.unlink(tmp)
                raise UserError(f"{gz_dir / (name + '.gz')} is corrupt ({problem}); replace it with a good copy")
            os.replace(tmp, target)
    except (EOFError, gzip.BadGzipFile) as e:  # before OSError: BadGzipFile is one
        raise UserError(f"a .gz file in {gz_dir} is damaged ({e}); replace it with a good copy") from None
    except OSError as e:
        raise UserError(
            f"cannot extract {info.folder} into {raw} ({e.strerror}); set data.cache_dir to a writable folder"
        ) from None
    return cache_root


def _torchvision_class(dataset: str) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, DATASETS[dataset].folder)


def locate_dataset(dataset: str, root: str, cache_dir: str = "", download: bool = True) -> Path:
    """Return a folder R such that R/<Folder>/raw holds the four uncompressed IDX files.

    <Folder> is MNIST, FashionMNIST or KMNIST. Looks in ``root/<Folder>/raw``, then for .gz
    files there (or directly in root, or root/raw), which are extracted into the cache; else
    downloads into root when allowed.
    """
    folder = DATASETS[dataset].folder
    root_p = Path(root).expanduser()
    if _has_raw(root_p / folder / "raw"):
        return root_p
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    for gz_dir in (root_p / folder / "raw", root_p / "raw", root_p):
        if _has_raw(gz_dir, ".gz"):
            return _extract(gz_dir, cache, dataset)
    looked = f"{root_p / folder / 'raw'} (IDX or .gz files)"
    if not download:
        raise UserError(f"{folder} not found in {looked}; copy the four IDX files there or set data.download=true")
    try:
        cls = _torchvision_class(dataset)
        cls(str(root_p), train=True, download=True)
        cls(str(root_p), train=False, download=True)
    except Exception as e:  # no network, DNS failure, HTTP error, unwritable root
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{folder} not found in {looked} and the download failed ({reason[:120]}); "
            f"set data.root to a folder holding {folder}/raw, or run once with network access"
        ) from None
    return root_p


def load_dataset(dataset: str, root: Path) -> tuple[Split, Split]:
    """Both splits as in-memory uint8 image and int64 label tensors (read through torchvision)."""
    cls = _torchvision_class(dataset)
    try:
        train = cls(str(root), train=True)
        test = cls(str(root), train=False)
    except Exception as e:  # torchvision asserts on a malformed IDX file
        raise UserError(
            f"cannot read {DATASETS[dataset].folder} from {root / DATASETS[dataset].folder / 'raw'} "
            f"({type(e).__name__}: {str(e).strip()[:120]}); replace the IDX files with good copies"
        ) from None
    return Split(train.data, train.targets), Split(test.data, test.targets)


def locate_mnist(root: str, cache_dir: str = "", download: bool = True) -> Path:
    """MNIST's ``locate_dataset`` (kept for callers and tests that predate the other data sets)."""
    return locate_dataset("mnist", root, cache_dir, download)


def load_mnist(root: Path) -> tuple[Split, Split]:
    return load_dataset("mnist", root)


def make_permutation(seed: int, length: int = 784) -> torch.Tensor:
    """The permuted_pixels order: a CPU generator seeded by ``seed`` gives every rank the same one."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def input_size(view: str) -> int:
    """Features per time step under ``view``: a row or column of 28 pixels, or one pixel."""
    return 28 if view in ("rows", "columns") else 1


def to_sequences(
    images: torch.Tensor,
    normalize: bool = False,
    view: str = "rows",
    permutation: torch.Tensor | None = None,
    dataset: str = "mnist",
) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, T, F] in [0, 1] (or standardised) under ``view``.

    rows: [B, 28, 28] (the image itself); columns: [B, 28, 28] (transposed); pixels: [B, 784, 1]
    in raster order; permuted_pixels: [B, 784, 1] in the order ``permutation``. Same values as
    torchvision's ToTensor() (x / 255), done per batch on the batch's device.
    """
    x = images.float().div_(255.0)
    if normalize:
        info = DATASETS[dataset]
        x = x.sub_(info.mean).div_(info.std)
    if view == "rows":
        return x
    if view == "columns":
        return x.transpose(1, 2).contiguous()  # contiguous: cuDNN's RNN wants dense input
    flat = x.reshape(x.shape[0], -1)
    if view == "permuted_pixels":
        if permutation is None:
            raise ValueError("view permuted_pixels needs a permutation")
        flat = flat[:, permutation.to(flat.device)]
    elif view != "pixels":
        raise ValueError(f"unknown view {view!r}; one of {VIEWS}")
    return flat.unsqueeze(-1)


def check_batch(global_batch_size: int, world_size: int, available: int, what: str) -> None:
    """One-line errors for a global batch the ranks cannot split evenly, or larger than the data."""
    if global_batch_size % world_size:
        raise UserError(
            f"train.global_batch_size={global_batch_size} is not divisible by the world size "
            f"{world_size}; pick a multiple of {world_size}"
        )
    if global_batch_size > available:
        raise UserError(f"train.global_batch_size={global_batch_size} is larger than {what} ({available})")


def rank_batches(sampler: DistributedSampler, epoch: int, batches: int, local_batch: int) -> torch.Tensor:
    """This rank's indices for ``epoch`` in the sampler's order, shape [batches, local_batch]."""
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    return idx[: batches * local_batch].view(batches, local_batch)


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
        view: str = "rows",
        permutation: torch.Tensor | None = None,
        dataset: str = "mnist",
    ) -> None:
        check_batch(global_batch_size, world_size, len(split), "the training set")
        self.split = split
        self.local_batch = global_batch_size // world_size
        self.steps_per_epoch = len(split) // global_batch_size
        self.sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.device = device
        self.normalize = normalize
        self.view, self.dataset = view, dataset
        self.permutation = permutation.to(device) if permutation is not None else None
        self._pin = device.type == "cuda" and split.images.device.type == "cpu"

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for the epoch, shape [steps_per_epoch, local_batch]."""
        return rank_batches(self.sampler, epoch, self.steps_per_epoch, self.local_batch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the epoch from ``start_step`` on (resume skips what was consumed)."""
        idx = self.indices(epoch).to(self.split.images.device)
        for step in range(start_step, self.steps_per_epoch):
            i = idx[step]
            # index_select, not images[i]: 8 us against 34 us for 64 rows on a CPU.
            images, labels = self.split.images.index_select(0, i), self.split.labels.index_select(0, i)
            if self._pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield to_sequences(images, self.normalize, self.view, self.permutation, self.dataset), labels


def eval_batches(
    split: Split,
    batch_size: int,
    device: torch.device,
    normalize: bool = False,
    view: str = "rows",
    permutation: torch.Tensor | None = None,
    dataset: str = "mnist",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test set in order, every sample exactly once (last batch may be short)."""
    if permutation is not None:
        permutation = permutation.to(device)
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
        yield to_sequences(images, normalize, view, permutation, dataset), labels
