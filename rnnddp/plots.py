"""Pictures of a run: learning curves for any task, and drawing helpers tasks use (confusion matrix, digits).

Rank 0 writes them at the end of a run (rnnddp.job) and ``python -m rnnddp.evaluate`` writes them
for a checkpoint; each task says which pictures it has (``Task.pictures``). matplotlib runs
headless (Agg) and is imported only when drawing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnddp.metrics import Metric, kept_records


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def preload() -> threading.Thread:
    """Import matplotlib in a daemon thread (a third of a second), so that drawing at the end of a run
    does not wait for it; the import overlaps with training kernels, which release the GIL."""
    thread = threading.Thread(target=pyplot, name="matplotlib-import", daemon=True)
    thread.start()
    return thread


def learning_curves(metrics_path: Path, out: Path, metric: Metric) -> Path:
    """Train and validation loss (left) and the validation metric (right) against the step; the test result as a star."""
    plt = pyplot()
    log_scale, metric = metric.log_scale, metric.name
    recs = kept_records(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    val = [(r["step"], r["val/loss"], r[f"val/{metric}"]) for r in recs if f"val/{metric}" in r]
    test = [(r["step"], r["test/loss"], r[f"test/{metric}"]) for r in recs if f"test/{metric}" in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train (mean since last log)")
    if val:
        steps, losses, values = zip(*val, strict=True)
        ax_loss.plot(steps, losses, "o-", label="validation")
        ax_metric.plot(steps, values, "o-", color="C1", label="validation")
    title = f"validation {metric}" + (f" (last {val[-1][2]:.4f})" if val else "")
    if test:
        step, loss, value = test[-1]
        ax_loss.plot([step], [loss], "*", color="C3", markersize=12, label="test (final model)")
        ax_metric.plot([step], [value], "*", color="C3", markersize=12, label="test (final model)")
        title += f"; test {value:.4f}"
    ax_metric.set_title(title)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax_loss.legend()
    ax_metric.set(xlabel="step", ylabel=metric, yscale="log" if log_scale else "linear")
    if val or test:
        ax_metric.legend()
    ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def confusion_matrix(confusion: torch.Tensor, out: Path, title: str = "", names: list[str] | None = None) -> Path:
    """Counts of [true label, predicted label] over the test set, with per-class accuracy on the rows."""
    plt = pyplot()
    counts = confusion.cpu()
    n = counts.shape[0]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # Log colour scale: the off-diagonal mistakes stay visible beside ~1000 correct per class.
    im = ax.imshow((counts.double() + 1).log10().numpy(), cmap="Blues")
    for t in range(n):
        for p in range(n):
            if counts[t, p]:
                ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=7,
                        color="white" if t == p else "black")  # fmt: skip
    acc = counts.diagonal().double() / counts.sum(dim=1).clamp(min=1)
    names = names or [str(t) for t in range(n)]
    ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(n), [f"{names[t]} ({acc[t]:.3f})" for t in range(n)])
    total = counts.diagonal().sum().item() / max(1, counts.sum().item())
    ax.set(xlabel="predicted", ylabel="true (class accuracy)", title=title or f"confusion matrix, accuracy {total:.4f}")
    fig.colorbar(im, ax=ax, label="log10(count + 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def sequence_examples(split: Any, predictions: torch.Tensor, names: list[str], out: Path, n: int = 8) -> Path:
    """A few test sequences as feature-by-step images, titled true / predicted; mistakes first."""
    plt = pyplot()
    labels = torch.from_numpy(np.array(split.labels, dtype=np.int64))  # a copy: the mapped labels are read-only
    wrong = (predictions != labels).nonzero().flatten()[: n // 2]
    right = (predictions == labels).nonzero().flatten()[: n - len(wrong)]
    chosen = torch.cat([wrong, right]).tolist()
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.3 * len(chosen)), squeeze=False)
    for ax, i in zip(axes[:, 0], chosen, strict=True):
        seq = split.sequence(i)
        ax.imshow(seq.T, aspect="auto", cmap="viridis", interpolation="nearest")
        ok = predictions[i] == labels[i]
        ax.set_title(f"#{i}: true {names[labels[i]]}, predicted {names[predictions[i]]}", fontsize=8,
                     color="black" if ok else "red")  # fmt: skip
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step (rows: features)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def step_examples(examples: list[tuple[int, Any, Any, Any, float]], out: Path, names: list[str] | None = None) -> Path:
    """A few test sequences with their per-step targets and predictions: ``examples`` holds, for each,
    (index in the split, features [T, F], targets and predictions per step [T] classes (``names`` given)
    or [T, K] values (the first drawn), its error: the share of wrong steps, or the MSE over all K)."""
    plt = pyplot()
    fig, axes = plt.subplots(2 * len(examples), 1, figsize=(8, 2.2 * len(examples)), squeeze=False)
    for k, (i, features, targets, predictions, error) in enumerate(examples):
        steps = len(features)
        top, bottom = axes[2 * k, 0], axes[2 * k + 1, 0]
        top.imshow(np.asarray(features).T, aspect="auto", cmap="viridis", interpolation="nearest")
        top.set_yticks([])
        score = f"accuracy {1 - error:.3f}" if names is not None else f"mse {error:.4g}"
        top.set_title(f"#{i}: {steps} steps, {score}", fontsize=8)
        t = np.asarray(targets).reshape(steps, -1)[:, 0]
        p = np.asarray(predictions).reshape(steps, -1)[:, 0]
        bottom.step(range(steps), t, where="mid", color="black", label="true")
        bottom.step(range(steps), p, where="mid", color="tab:red", linestyle="--", label="predicted")
        bottom.set_xlim(-0.5, steps - 0.5)
        if names is not None and len(names) <= 12:
            bottom.set_yticks(range(len(names)), names, fontsize=6)
        bottom.legend(fontsize=6, loc="upper right")
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step (upper rows: features)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def digit_grid(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, out: Path, n: int = 64) -> Path:
    """Test digits labelled predicted/true; mistakes (up to half the grid) come first, framed in red.

    One tiled image on one axes, not a subplot per digit: drawing 64 axes took a second.
    """
    plt = pyplot()
    all_wrong = (predictions != labels).nonzero().flatten()
    wrong = all_wrong[: n // 2]
    right = (predictions == labels).nonzero().flatten()[: n - len(wrong)]
    chosen = torch.cat([wrong, right]).tolist()
    cols, cell, pad, band = 8, 28, 2, 10  # a digit, its 2-pixel frame, and a label band above it
    rows = max(1, (len(chosen) + cols - 1) // cols)
    width, height = cell + 2 * pad + 4, cell + 2 * pad + band
    canvas = torch.ones(rows * height, cols * width, 3)  # white
    for k, i in enumerate(chosen):
        r, c = divmod(k, cols)
        y, x = r * height + band, c * width + 2
        if predictions[i] != labels[i]:
            canvas[y : y + cell + 2 * pad, x : x + cell + 2 * pad] = torch.tensor([0.85, 0.1, 0.1])  # red frame
        canvas[y + pad : y + pad + cell, x + pad : x + pad + cell] = images[i].cpu().float().div(255)[..., None]
    fig, ax = plt.subplots(figsize=(cols * 1.2, rows * 1.45))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.axis("off")
    for k, i in enumerate(chosen):
        r, c = divmod(k, cols)
        mistake = bool(predictions[i] != labels[i])
        ax.text(c * width + width / 2, r * height + band - 1, f"{int(predictions[i])}/{int(labels[i])}", ha="center",
                va="bottom", fontsize=8, color="red" if mistake else "black")  # fmt: skip
    ax.set_title(f"predicted/true; {len(wrong)} of {len(all_wrong)} mistakes shown (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(
    out_dir: Path,
    pictures: dict[str, Callable[[Path], Path]],
    *,
    metrics_path: Path | None = None,
    metric: Metric | None = None,
    prefix: str = "",
) -> dict[str, Path]:
    """Draw the learning curves (from ``metrics_path``) and each of ``pictures`` into ``out_dir``; returns {name: file}.

    Pictures are a by-product: a failure (no matplotlib, unwritable folder) is a warning, never
    the end of a training run or an evaluation.
    """
    written: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metric is not None and metrics_path.is_file():
            out = out_dir / f"{prefix}learning_curves.png"
            written["learning_curves"] = learning_curves(metrics_path, out, metric)
        for name, draw in pictures.items():
            written[name] = draw(out_dir / f"{prefix}{name}.png")
    except Exception as e:  # see the docstring
        logging.getLogger("rnnddp").warning("could not draw the plots in %s: %s", out_dir, str(e).splitlines()[0])
    return written
