"""Variable-length training speed: real (non-padding) steps per second, bucketed vs random vs fixed length.

    python -m bench.sequences [--sequences 2000] [--features 40] [--batch 32] [--steps 30] [--hidden 128]
                              [--device cpu|cuda]

A synthetic prepared data set with log-normal lengths (20-2,000 steps, 40 features) is trained
for ``--steps`` optimiser steps by one process in three ways: length-bucketed batches, random
batches (padded to their longest), and sequences all of one fixed length with the same total
number of steps, each as the job runs a one-way LSTM (padded, read at each sequence's last real
step). Also timed: the same batches run packed (``pack_padded_sequence``, what a bidirectional
stack needs). Printed, not asserted: real steps/s per way, the ratios, and the padding share.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rnnddp.data.sequences import SequenceBatches, open_prepared, pack, write_prepared
from rnnddp.dist import flush_denormals
from rnnddp.models import SequenceClassifier, place


def synthetic(out: Path, n: int, features: int, fixed: bool, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=n), 20, 2000).astype(np.int64)
    if fixed:
        lengths = np.full(n, int(lengths.mean()))
    seqs = [rng.normal(size=(int(t), features)).astype(np.float32) for t in lengths]
    labels = rng.integers(0, 5, size=n)
    split = pack(seqs, labels, None)
    return write_prepared(out, {"train": split, "val": split, "test": split}, [str(c) for c in range(5)], {})


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()


def timed(batches: SequenceBatches, model: SequenceClassifier, steps: int, packed: bool) -> tuple[float, float]:
    """(real steps per second, padding share) over ``steps`` optimiser steps after two warm-up steps."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    it = batches.epoch(0)
    real = padded = 0
    start = 0.0
    for i in range(steps + 2):
        if i == 2:
            sync(batches.device)
            start, real, padded = time.perf_counter(), 0, 0
        x, lengths, y, _ = next(it)
        if packed:
            packed_x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = model.rnn(packed_x)
            logits = model.head(h_n[-1])
        else:  # padded: read the top layer's output at each sequence's last real step (what the job does)
            logits = model(x, lengths)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        real += int(lengths.sum())
        padded += x.shape[0] * x.shape[1]
    sync(batches.device)
    took = time.perf_counter() - start
    return real / took, 1 - real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=2000)
    p.add_argument("--features", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuDNN's kernels, padded and packed)")
    a = p.parse_args()
    device = torch.device(a.device)
    flush_denormals()  # as the job does: fading gradients would otherwise slow some runs, not others
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rnnddp-bench-seq-") as tmp:
        var = open_prepared(synthetic(Path(tmp) / "var", a.sequences, a.features, fixed=False))
        fix = open_prepared(synthetic(Path(tmp) / "fix", a.sequences, a.features, fixed=True))

        def run(data, bucket: bool, packed: bool = False) -> tuple[float, float]:
            model = place(SequenceClassifier("lstm", a.features, a.hidden, num_classes=5), device)
            batches = SequenceBatches(
                data.split("train"), global_batch_size=a.batch, rank=0, world_size=1, seed=0,
                device=device, bucket=bucket,
            )  # fmt: skip
            return timed(batches, model, a.steps, packed)

        rows = {
            "fixed length (same total steps)": run(fix, bucket=False),
            "bucketed": run(var, bucket=True),
            "random batches": run(var, bucket=False),
            "bucketed, packed": run(var, bucket=True, packed=True),
            "random batches, packed": run(var, bucket=False, packed=True),
        }
    print(
        f"LSTM-{a.hidden}, {a.features} features, batch {a.batch}, {a.steps} steps, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU thread(s)'}"
    )
    print("| batches | real steps/s | padding |")
    print("| --- | --- | --- |")
    for name, (rate, pad) in rows.items():
        print(f"| {name} | {rate:,.0f} | {pad:.1%} |")
    fixed, bucketed, random = (
        rows["fixed length (same total steps)"][0],
        rows["bucketed"][0],
        rows["random batches"][0],
    )
    print(f"bucketed / random: {bucketed / random:.2f}x; bucketed / fixed length: {bucketed / fixed:.2f}x")


if __name__ == "__main__":
    main()
