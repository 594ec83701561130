"""No-grad evaluation of the unwrapped module on the whole test set (rank 0 alone; no collectives).

Also the command line: ``python -m rnnddp.evaluate CHECKPOINT [key=value ...]`` rebuilds the
network a checkpoint records (its ``model_args``, config and pixel permutation) and prints the
test loss, accuracy and per-class accuracy (for a sine_regression checkpoint: the held-out MSE). CHECKPOINT may be a ``.pt`` file or a run directory
(its newest intact checkpoint is used); overrides such as ``data.root=...`` apply on top of the
checkpoint's stored config. It also draws the confusion matrix, a grid of test digits and the
run's learning curves into ``run_dir/plots/<checkpoint>_*.png`` (``--no-plots`` skips them).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnddp import checkpoint, dist
from rnnddp.config import from_saved
from rnnddp.data import Split, eval_batches, load_dataset, locate_dataset, make_permutation
from rnnddp.data import input_size as view_input_size
from rnnddp.errors import UserError
from rnnddp.models import build_model
from rnnddp.plots import write_plots


@torch.no_grad()
def evaluate(
    module: nn.Module,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    normalize: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
    view: str = "rows",
    permutation: torch.Tensor | None = None,
    dataset: str = "mnist",
    num_classes: int = 0,
    predictions: bool = False,
) -> dict[str, Any]:
    """Mean cross-entropy and accuracy over every sample of ``split`` (none dropped, none twice).

    With ``num_classes > 0`` the result also holds ``confusion``: a [true, predicted] count matrix;
    with ``predictions`` it holds ``predictions``: every sample's predicted label (CPU, in order).
    """
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    preds: list[torch.Tensor] = []
    seen = 0
    for x, y in eval_batches(split, batch_size, device, normalize, view, permutation, dataset):
        with autocast or contextlib.nullcontext():
            logits = module(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        pred = logits.argmax(dim=1)
        correct += (pred == y).sum()
        if num_classes:
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        if predictions:
            preds.append(pred.cpu())
        seen += len(y)
    module.train(was_training)
    result: dict[str, Any] = {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, "samples": float(seen)}
    if num_classes:
        result["confusion"] = confusion.view(num_classes, num_classes).cpu()
    if predictions:
        result["predictions"] = torch.cat(preds)
    return result


@dataclass
class Restored:
    """A checkpoint's network in eval mode, with what is needed to feed it like training did."""

    module: nn.Module
    cfg: Any  # the checkpoint's config with the command line's overrides
    permutation: torch.Tensor | None
    path: Path
    state: dict[str, Any]

    @property
    def regression(self) -> bool:
        return self.state["model_args"].get("name") == "regressor"

    @property
    def num_classes(self) -> int:
        return int(self.state["model_args"].get("num_classes", 10))

    def describe(self) -> str:
        args, data = self.state["model_args"], self.cfg.data
        if args.get("name", "rnn") == "cnn":
            net = "cnn"
        elif self.regression:
            return f"{args['cell']}-{args['hidden_size']}x{args['num_layers']}, task sine_regression"
        else:
            net = f"{'bi' if args['bidirectional'] else ''}{args['cell']}-{args['hidden_size']}x{args['num_layers']}"
        return f"{net}, view {data.view}, data set {data.dataset}"


def restore(target: str | Path, overrides: list[str]) -> Restored:
    """Load CHECKPOINT (a .pt file or a run directory) and rebuild its network (raises UserError)."""

    path = Path(target)
    if path.is_dir():
        found = checkpoint.CheckpointManager(path).find_latest()
        if found is None:
            raise UserError(f"no intact checkpoint in {path / 'checkpoints'}; pass a .pt file or a run directory")
        path = found
    elif not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    reason = checkpoint.verify(path, require_marker=False)
    if reason is not None:
        raise UserError(f"checkpoint {path}: {reason}; pick another checkpoint")
    state = checkpoint.load(path)
    if not isinstance(state, dict) or "model_args" not in state or "model" not in state:
        raise UserError(f"{path} is not an rnnddp checkpoint (no model or model_args)")
    cfg = from_saved(state.get("config") or {}, overrides)
    args = state["model_args"]
    if args.get("name", "rnn") == "rnn" and args.get("input_size") != view_input_size(cfg.data.view):
        # An override such as data.view=pixels on a rows model: refuse before a shape error.
        raise UserError(
            f"checkpoint {path} expects {args.get('input_size')} features per step; data.view={cfg.data.view} "
            f"gives {view_input_size(cfg.data.view)}; leave data.view as the checkpoint has it"
        )
    module = build_model(args)
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {path}: weights do not fit its model_args ({str(e).splitlines()[0][:120]})"
        ) from None
    module.eval()
    permutation = state.get("permutation")
    if cfg.data.view == "permuted_pixels" and permutation is None:
        # Written by a job that stored no permutation: regenerate it from the recorded seed.
        permutation = make_permutation(cfg.data.permutation_seed)
    return Restored(module, cfg, permutation, path, state)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_evaluation(target: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Evaluate a checkpoint on its data set's test split; returns evaluate()'s dict plus per-class accuracy."""

    r = restore(target, overrides)
    data = r.cfg.data
    device = _device()
    if device.type == "cuda":
        dist.configure_cuda(r.cfg.train.tf32)  # the run's math (checkpoints from before the key: TF32 on)
    r.module.to(device)
    # The precision the run evaluated in (bf16 autocast shifts a few predictions), so the
    # printed result is the one the training run logged.
    from rnnddp.trainer import autocast_context, resolve_precision  # here: trainer imports this module

    precision = resolve_precision(r.cfg.train.precision, device)
    if r.regression:
        from rnnddp.sine import evaluate_sine, make_splits

        _, test = make_splits(data, r.cfg.seed)
        result = evaluate_sine(
            r.module,
            test,
            batch_size=r.cfg.eval.batch_size,
            device=device,
            autocast=autocast_context(precision, device),
            predictions=True,
        )
        return {**result, "test": test, "precision": precision, "restored": r}
    _, test = load_dataset(data.dataset, locate_dataset(data.dataset, data.root, data.cache_dir, data.download))
    result = evaluate(
        r.module,
        test,
        batch_size=r.cfg.eval.batch_size,
        device=device,
        normalize=data.normalize,
        view=data.view,
        permutation=r.permutation,
        dataset=data.dataset,
        num_classes=r.num_classes,
        predictions=True,
        autocast=autocast_context(precision, device),
    )
    result["test"] = test
    result["precision"] = precision
    confusion = result["confusion"]
    totals = confusion.sum(dim=1)
    result["per_class"] = (confusion.diagonal().double() / totals.clamp(min=1)).tolist()
    result["class_counts"] = totals.tolist()
    result["restored"] = r
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m rnnddp.evaluate CHECKPOINT [key=value ...]``; exit 2 with one line on bad input."""

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    dist.flush_denormals()  # before any tensor work, as the job does (train.flush_denormals)
    plots = "--no-plots" not in argv
    argv = [a for a in argv if a != "--no-plots"]
    try:
        result = run_evaluation(argv[0], argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    r: Restored = result["restored"]
    print(f"checkpoint {r.path} (step {r.state.get('global_step', '?')}; {r.describe()}; {result['precision']})")
    # Beside the run's own plots: run_dir/plots/<checkpoint>_*.png (or next to a lone .pt file).
    run_dir = r.path.parent.parent if r.path.parent.name == "checkpoints" else r.path.parent
    test: Split = result["test"]
    plot_args: dict[str, Any] = dict(metrics_path=run_dir / "metrics.jsonl", prefix=f"{r.path.stem}_")
    if r.regression:
        print(
            f"test mse {result['mse']:.6f}  ({int(result['samples'])} held-out sequences of {test.labels.shape[1]} steps)"
        )
        plot_args.update(sine_inputs=test.images, sine_targets=test.labels, predictions=result["predictions"])
    else:
        _print_classification(result)
        plot_args.update(
            confusion=result["confusion"], images=test.images, labels=test.labels, predictions=result["predictions"]
        )
    if plots:
        for path in write_plots(run_dir / "plots", **plot_args).values():
            print(f"wrote {path}")
    return 0


def _print_classification(result: dict[str, Any]) -> None:
    print(f"test loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  ({int(result['samples'])} images)")
    print("per-class accuracy:")
    for label, (acc, n) in enumerate(zip(result["per_class"], result["class_counts"], strict=True)):
        print(f"  {label}: {acc:.4f}  ({n} images)")


if __name__ == "__main__":
    sys.exit(main())
