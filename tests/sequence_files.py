"""Per-step sequence files for tests: a class or two values at every step, each needing a memory.

Classes: where the running sum of feature 0 stands (``low`` / ``mid`` / ``high``): no single step
tells. Values: feature 0 three steps back and feature 1 one step back. Lengths 10-59.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def step_sequences(n: int, seed: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as object arrays of [T_i, 3] features and [T_i] class names or [T_i, 2] values."""
    rng = np.random.default_rng(seed)
    x, y = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i in range(n):
        f = rng.standard_normal((int(rng.integers(10, 60)), 3)).astype(np.float32)
        if kind == "classes":
            c = np.cumsum(f[:, 0]) / 2
            y[i] = np.where(c < -1, "low", np.where(c > 1, "high", "mid"))
        else:
            d = np.zeros((len(f), 2), np.float32)
            d[3:, 0], d[1:, 1] = f[:-3, 0], f[:-1, 1]
            y[i] = d
        x[i] = f
    return x, y


def write_csv(path: Path, seq: np.ndarray, header: str = "") -> Path:
    """One sequence as rnnddp-predict reads a .csv: a row per step, a column per feature."""
    rows = "\n".join(",".join(f"{v:.9g}" for v in row) for row in seq)
    path.write_text((header + "\n" if header else "") + rows + "\n")
    return path


def write_step_files(folder: Path, kind: str, train: int = 1000, test: int = 300) -> tuple[Path, Path]:
    """``folder/<kind>_train.npz`` and ``<kind>_test.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        x, y = step_sequences(n, seed, kind)
        np.savez(folder / f"{kind}_{split}.npz", x=x, y=y)
        paths.append(folder / f"{kind}_{split}.npz")
    return paths[0], paths[1]


def tiny_prepared(root: Path, train: int = 30, test: int = 8) -> Path:
    """A prepared folder of short random sequences (2 features, 4-8 steps) with two classes; 30 train
    sequences give 24 to train on (3 batches of 8) and 6 to validation."""
    from rnnddp.prepare import prepare

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        x = np.empty(n, dtype=object)
        for i in range(n):
            x[i] = rng.standard_normal((int(rng.integers(4, 9)), 2)).astype(np.float32)
        np.savez(root / f"{split}.npz", x=x, y=np.array(["a", "b"] * (n // 2)))
    return prepare(root / "train.npz", root / "test.npz", root / "prepared")
