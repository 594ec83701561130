"""The MNIST family on disk: IDX files found, extracted from .gz, or downloaded, and read into memory.

``data.dataset`` picks MNIST, Fashion-MNIST or KMNIST (the same 28x28 IDX layout under
``root/<Folder>/raw``). A read-only folder of ``.gz`` files (a shared copy) is extracted into a
cache; a machine with internet downloads through torchvision. The files are read here, without
torchvision, into uint8 tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnddp.data.batches import Split
from rnnddp.errors import UserError

MNIST_FILES = {  # uncompressed name -> md5 of the uncompressed file
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # root/<folder>/raw, and the torchvision class of the same name
    md5: dict[str, str] | None  # of the uncompressed IDX files, where known
    mean: float  # training-set pixel mean and std after scaling to [0, 1] (data.normalize)
    std: float


# The registry of data sets (data.dataset). All three use MNIST's four file names and IDX layout.
# torchvision only knows the md5s of the other two's .gz files, so their extracted files are
# checked by IDX header and size instead.
DATASETS = {
    "mnist": DatasetInfo("MNIST", MNIST_FILES, 0.1307, 0.3081),
    "fashion_mnist": DatasetInfo("FashionMNIST", None, 0.2860, 0.3530),
    "kmnist": DatasetInfo("KMNIST", None, 0.1918, 0.3483),
}


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


def torchvision_class(dataset: str) -> type:
    import torchvision.datasets  # only to download, or for tests that compare with it

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
        _download(dataset, root_p)
    except Exception as e:  # no network, DNS failure, HTTP error, unwritable root
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{folder} not found in {looked} and the download failed ({reason[:120]}); "
            f"set data.root to a folder holding {folder}/raw, or run once with network access"
        ) from None
    return root_p


def _download(dataset: str, root: Path) -> None:
    """torchvision's download into a temporary folder beside the data set, then each file renamed into
    ``root/<Folder>/raw``: a reader (another node's rank, a killed download's rerun) sees each file
    whole or not at all. Nodes sharing ``root`` may each download; the renames replace like with like."""
    folder = DATASETS[dataset].folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}.download."))
    try:
        cls = torchvision_class(dataset)
        cls(str(tmp), train=True, download=True)
        cls(str(tmp), train=False, download=True)
        raw = root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in sorted((tmp / folder / "raw").iterdir()):
            os.replace(f, raw / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_idx(path: Path) -> torch.Tensor:
    problem = _idx_problem(path)
    if problem:
        raise UserError(f"cannot read {path} ({problem}); replace the IDX files with good copies")
    data = bytearray(path.read_bytes())
    if "images" in path.name:
        return torch.frombuffer(data, dtype=torch.uint8, offset=16).view(-1, 28, 28)
    return torch.frombuffer(data, dtype=torch.uint8, offset=8).long()


def load_dataset(dataset: str, root: Path) -> tuple[Split, Split]:
    """The official train and test splits as in-memory uint8 images and int64 labels."""
    raw = Path(root) / DATASETS[dataset].folder / "raw"
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte")
        labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise UserError(f"{raw}: {len(images)} {prefix} images but {len(labels)} labels; replace the IDX files")
        splits.append(Split(images, labels))
    return splits[0], splits[1]
