"""Pictures of a run: learning curves, a confusion matrix, a grid of test digits.

Rank 0 writes them at the end of a run (rnnddp.job) and ``python -m rnnddp.evaluate`` writes them
for a checkpoint. matplotlib runs headless (Agg) and is imported only here, only when drawing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def effective_records(metrics_path: Path) -> list[dict]:
    """metrics.jsonl records that count: a ``resume`` event at step N voids the later records before it."""
    records: list[dict] = []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("event") == "resume":
            records = [r for r in records if r["step"] <= rec["step"]]
        elif "event" not in rec:
            records.append(rec)
    return records


def learning_curves(metrics_path: Path, out: Path) -> Path:
    """Train and test loss (left) and test accuracy (right) against the optimiser step."""
    plt = _pyplot()
    recs = effective_records(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    test = [(r["step"], r["eval/loss"], r["eval/accuracy"]) for r in recs if "eval/accuracy" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train (mean since last log)")
    if test:
        steps, losses, accs = zip(*test, strict=True)
        ax_loss.plot(steps, losses, "o-", label="test")
        ax_acc.plot(steps, accs, "o-", color="C1")
        ax_acc.set_title(f"test accuracy (last {accs[-1]:.4f})")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.set(xlabel="step", ylabel="accuracy")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def confusion_matrix(confusion: torch.Tensor, out: Path, title: str = "") -> Path:
    """Counts of [true label, predicted label] over the test set, with per-class accuracy on the rows."""
    plt = _pyplot()
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
    ax.set_xticks(range(n))
    ax.set_yticks(range(n), [f"{t} ({acc[t]:.3f})" for t in range(n)])
    total = counts.diagonal().sum().item() / max(1, counts.sum().item())
    ax.set(xlabel="predicted", ylabel="true (class accuracy)", title=title or f"confusion matrix, accuracy {total:.4f}")
    fig.colorbar(im, ax=ax, label="log10(count + 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def digit_grid(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, out: Path, n: int = 64) -> Path:
    """Test digits titled predicted/true; mistakes (up to half the grid) come first, framed in red."""
    plt = _pyplot()
    all_wrong = (predictions != labels).nonzero().flatten()
    wrong = all_wrong[: n // 2]
    right = (predictions == labels).nonzero().flatten()[: n - len(wrong)]
    chosen = torch.cat([wrong, right])
    cols = 8
    rows = max(1, (len(chosen) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen.tolist(), strict=False):
        mistake = bool(predictions[i] != labels[i])
        ax.imshow(images[i].cpu().numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{int(predictions[i])}/{int(labels[i])}", fontsize=9, color="red" if mistake else "black")
        if mistake:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    fig.suptitle(f"predicted/true; {len(wrong)} of {len(all_wrong)} mistakes shown (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(
    out_dir: Path,
    *,
    metrics_path: Path | None = None,
    confusion: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    predictions: torch.Tensor | None = None,
    prefix: str = "",
) -> dict[str, Path]:
    """Draw whatever the inputs allow into ``out_dir``; returns {name: file}.

    Pictures are a by-product: a failure (no matplotlib, unwritable folder) is a warning, never
    the end of a training run or an evaluation.
    """
    import logging

    written: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None and metrics_path.is_file():
            written["learning_curves"] = learning_curves(metrics_path, out_dir / f"{prefix}learning_curves.png")
        if confusion is not None:
            written["confusion_matrix"] = confusion_matrix(confusion, out_dir / f"{prefix}confusion_matrix.png")
        if images is not None and labels is not None and predictions is not None:
            written["test_digits"] = digit_grid(images, labels, predictions, out_dir / f"{prefix}test_digits.png")
    except Exception as e:  # see the docstring
        logging.getLogger("rnnddp").warning("could not draw the plots in %s: %s", out_dir, str(e).splitlines()[0])
    return written
