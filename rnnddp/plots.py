"""Pictures of a run: learning curves, a confusion matrix, a grid of test digits; for the sine
task, predictions against the target.

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
    """Train and test loss (left) and the test metric (right: accuracy, or MSE) against the step."""
    plt = _pyplot()
    recs = effective_records(metrics_path)
    metric = "mse" if any("eval/mse" in r for r in recs) else "accuracy"
    train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    test = [(r["step"], r["eval/loss"], r[f"eval/{metric}"]) for r in recs if f"eval/{metric}" in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train (mean since last log)")
    if test:
        steps, losses, values = zip(*test, strict=True)
        ax_loss.plot(steps, losses, "o-", label="test")
        ax_metric.plot(steps, values, "o-", color="C1")
        ax_metric.set_title(f"test {metric} (last {values[-1]:.4f})")
    ax_loss.set(xlabel="step", ylabel="MSE" if metric == "mse" else "cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_metric.set(xlabel="step", ylabel=metric, yscale="log" if metric == "mse" else "linear")
    ax_metric.grid(alpha=0.3)
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


def sine_prediction(
    inputs: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor, out: Path, n: int = 3
) -> Path:
    """The first ``n`` held-out sequences: input sin, target cos and the prediction, step by step."""
    plt = _pyplot()
    n = min(n, len(targets))
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n), squeeze=False, sharex=True)
    for k, ax in enumerate(axes[:, 0]):
        t = range(targets.shape[1])
        ax.plot(t, inputs[k, :, 0].cpu(), color="0.7", lw=1, label="input sin(t)")
        ax.plot(t, targets[k, :, 0].cpu(), "r-", lw=1.5, label="target cos(t)")
        ax.plot(t, predictions[k, :, 0].cpu(), "b--", lw=1.5, label="prediction")
        mse = torch.mean((predictions[k] - targets[k].cpu()) ** 2).item()
        ax.set_title(f"held-out sequence {k}: MSE {mse:.5f}", fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step (the hidden state carries across chunks)")
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
    sine_inputs: torch.Tensor | None = None,
    sine_targets: torch.Tensor | None = None,
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
        if sine_inputs is not None and sine_targets is not None and predictions is not None:
            out = out_dir / f"{prefix}sine_prediction.png"
            written["sine_prediction"] = sine_prediction(sine_inputs, sine_targets, predictions, out)
    except Exception as e:  # see the docstring
        logging.getLogger("rnnddp").warning("could not draw the plots in %s: %s", out_dir, str(e).splitlines()[0])
    return written
