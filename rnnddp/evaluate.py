"""Evaluate a checkpoint on its task's test split: ``python -m rnnddp.evaluate CHECKPOINT [key=value ...]``.

Rebuilds the network a checkpoint records (its ``model_args``, config, and what its task stored,
such as the pixel permutation) and prints the test result in the precision the run used: for
classify, loss, accuracy and per-class accuracy; for sine_regression, the MSE; for language_model, the
loss per token and perplexity or bits per character (``--text FILE``: over any text file, in the
checkpoint's tokens, instead of the test split). CHECKPOINT may be a
``.pt`` file or a run directory (its newest intact checkpoint is used); overrides such as
``data.root=...`` apply on top of the checkpoint's stored config. A checkpoint of a run that averaged
its weights (``average.mode``) is evaluated on the averaged weights it holds (``averaged_model``), as the
run's validation and final test were; so are rnnddp-predict and rnnddp-generate, which restore it the
same way. It also draws the task's
pictures and the run's learning curves into ``run_dir/plots/<checkpoint>_*.png`` (``--no-plots``
skips them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnddp import checkpoint, dist
from rnnddp.config import from_saved
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError, require_writable
from rnnddp.models import build_model
from rnnddp.plots import write_plots
from rnnddp.tasks import TASKS, Task
from rnnddp.train.precision import resolve_precision


@dataclass
class Restored:
    """A checkpoint's network in eval mode, with its task set up to feed it like training did."""

    module: nn.Module
    cfg: Any  # the checkpoint's config with the command line's overrides
    task: Task
    path: Path
    state: dict[str, Any]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def checkpoint_path(target: str | Path) -> Path:
    """The file CHECKPOINT names: itself, or a run directory's newest intact checkpoint (raises UserError)."""
    path = Path(target)
    if path.is_dir():
        found = checkpoint.CheckpointManager(path).find_latest()
        if found is None:
            raise UserError(f"no intact checkpoint in {path / 'checkpoints'}; pass a .pt file or a run directory")
        return found
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    return path


def model_checkpoint(target: str | Path) -> Path:
    """A run directory's best.pt (validation's choice) when it has one, else what evaluate would take."""
    best = Path(target) / "checkpoints" / "best.pt"
    return best if Path(target).is_dir() and best.is_file() else checkpoint_path(target)


def plots_dir(path: Path) -> Path:
    """Where evaluate draws for checkpoint ``path``: its run's plots/ (or beside a lone .pt file)."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "plots"


def restore(target: str | Path, overrides: list[str], device: torch.device | None = None) -> Restored:
    """Load CHECKPOINT (a .pt file or a run directory) and rebuild its network and task (raises UserError).

    The network gets the checkpoint's averaged weights when it has them (``averaged_model``), else ``model``.
    """
    path = checkpoint_path(target)
    reason = checkpoint.verify(path, require_marker=False)
    if reason is not None:
        raise UserError(f"checkpoint {path}: {reason}; pick another checkpoint")
    state = checkpoint.load(path)
    if not isinstance(state, dict) or "model_args" not in state or "model" not in state:
        raise UserError(f"{path} is not an rnnddp checkpoint (no model or model_args)")
    if state.get("format", 1) > checkpoint.FORMAT:
        raise UserError(
            f"checkpoint {path} has format {state['format']}, newer than this rnnddp reads ({checkpoint.FORMAT}); "
            "upgrade rnnddp"
        )
    saved_task = (state.get("config") or {}).get("task", "classify")
    if saved_task not in TASKS:
        raise UserError(
            f"checkpoint {path} is of task={saved_task}, which this rnnddp does not know (known: {', '.join(TASKS)})"
        )
    cfg = from_saved(state.get("config") or {}, overrides)
    task = TASKS[cfg.task](cfg, DistInfo(device=device or torch.device("cpu")))
    args = state["model_args"]
    task.check_restorable(args, path)  # e.g. an override that gives the model inputs of another size
    module = build_model(args)
    averaged = state.get("averaged_model")
    try:
        module.load_state_dict(averaged if averaged is not None else state["model"])
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {path}: weights do not fit its model_args ({str(e).splitlines()[0][:120]})"
        ) from None
    module.eval()
    task.load_state_dict(state)  # what the run stored for evaluation (the pixel permutation)
    return Restored(module, cfg, task, path, state)


def run_evaluation(target: str | Path, overrides: list[str], text: Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on its task's test split (or, for a language model, any ``text`` file);
    returns the task's result with ``detail``."""
    device = _device()
    r = restore(target, overrides, device)
    if device.type == "cuda":
        dist.configure_cuda(r.cfg.train.tf32)  # the run's math (checkpoints from before the key: TF32 on)
    r.module.to(device)
    # The precision the run evaluated in (bf16 autocast shifts a few predictions), so the
    # printed result is the one the training run logged.
    precision = resolve_precision(r.cfg.train.precision, device)
    if text is not None:
        if not hasattr(r.task, "text_split"):
            raise UserError(f"--text is for language models; {r.path} is a task={r.cfg.task} model")
        test = r.task.text_split(text)
    else:
        test = r.task.load().test
    result = r.task.evaluate(r.module, test, precision.autocast(), detail=True)
    return {**result, "test": test, "precision": precision.name, "restored": r, "source": str(text or "test")}


def main(argv: list[str] | None = None) -> int:
    """``python -m rnnddp.evaluate CHECKPOINT [key=value ...]``; exit 2 with one line on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    dist.flush_denormals()  # before any tensor work, as the job does (train.flush_denormals)
    plots = "--no-plots" not in argv
    argv = [a for a in argv if a != "--no-plots"]
    text = None
    if "--text" in argv:  # a language model on any text file instead of its test split
        at = argv.index("--text")
        if at + 1 >= len(argv):
            print("error: --text needs a FILE", file=sys.stderr)
            return 2
        text = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    try:
        if plots:  # before the work: an unwritable folder is bad input, not a lost picture
            require_writable(plots_dir(checkpoint_path(argv[0])), "pass --no-plots, or make it writable")
        result = run_evaluation(argv[0], argv[1:], text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    r: Restored = result["restored"]
    weights = "; averaged weights" if r.state.get("averaged_model") is not None else ""
    print(
        f"checkpoint {r.path} (step {r.state.get('global_step', '?')}; {r.task.describe()}; {result['precision']}"
        f"{weights})"
    )
    for line in r.task.report(result, result["test"]):
        print(line)
    if plots:
        # Beside the run's own plots: run_dir/plots/<checkpoint>_*.png (or next to a lone .pt file).
        out = plots_dir(r.path)
        pictures = r.task.pictures(result, result["test"])
        written = write_plots(
            out,
            pictures,
            metrics_path=out.parent / "metrics.jsonl",
            metric=r.task.metric,
            prefix=f"{r.path.stem}_",
        )
        for path in written.values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    dist.fast_exit(main())
