"""classify: a digit label per 28x28 image (MNIST, Fashion-MNIST, KMNIST), read as a sequence by ``data.view``.

The validation split is ``data.val_size`` images held out of the official training set by a
fixed draw (the same images whatever the seed or world size); the official test set is only
evaluated at the end of training and by ``rnnddp-evaluate``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnddp import dist, plots
from rnnddp.data.batches import Split, TrainBatches, eval_batches, hold_out
from rnnddp.data.images import load_image
from rnnddp.data.mnist import DATASETS, load_dataset, locate_dataset
from rnnddp.data.views import IMAGE_VIEWS, VIEWS, ImageView, make_permutation
from rnnddp.errors import UserError
from rnnddp.export.graphs import Tensor
from rnnddp.metrics import Metric
from rnnddp.models import classifier_args
from rnnddp.tasks.base import Picture, Serving, Splits, Task, per_class_report

VAL_SEED = 20_260_601  # the validation draw: fixed, so every run of a data set validates on the same images


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | fashion_mnist | kmnist
    root: str = "data"  # holds MNIST/raw/ (FashionMNIST/raw/, KMNIST/raw/); downloaded there when absent and online
    cache_dir: str = ""  # where .gz-only copies are extracted; "" = ~/.cache/rnnddp
    download: bool = True
    normalize: bool = False  # mean/std normalisation on top of the [0, 1] scaling
    device_resident: str = "auto"  # auto | true | false: keep the training set on the GPU
    view: str = "rows"  # rows | columns | pixels | permuted_pixels: how an image becomes a sequence
    permutation_seed: int = 0  # permuted_pixels: the fixed pixel order (same on every rank)
    val_size: int = 5000  # training images held out for validation (model selection); 0: none


class Classify(Task):
    name = "classify"
    section = "data"
    Section = DataConfig
    metric = Metric("accuracy", higher_is_better=True)
    choices = {
        "data.dataset": tuple(DATASETS),
        "data.view": tuple(VIEWS),
        "data.device_resident": ("auto", "true", "false"),
    }

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.model.name == "cnn" and cfg.data.view not in IMAGE_VIEWS:
            raise UserError(
                f"model.name=cnn needs a 2-D image: data.view must be rows or columns, not {cfg.data.view!r}"
            )
        if cfg.data.val_size < 0:
            raise UserError("bad value for config key 'data.val_size': must be >= 0")

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        data = cfg.data
        perm = make_permutation(data.permutation_seed) if data.view == "permuted_pixels" else None
        info_ds = DATASETS[data.dataset]
        mean, std = (info_ds.mean, info_ds.std) if data.normalize else (None, None)
        self.view = ImageView(data.view, perm, mean, std)

    def model_args(self) -> dict:
        return classifier_args(self.cfg.model, input_size=self.view.input_size, num_classes=10)

    def load(self) -> Splits:
        """The official splits with ``data.val_size`` training images held out; local rank 0 extracts or downloads first."""
        data, info = self.cfg.data, self.info
        error: UserError | None = None
        root = None
        if info.local_rank == 0:
            try:
                root = locate_dataset(data.dataset, data.root, data.cache_dir, data.download)
            except UserError as e:
                error = e
        if not dist.all_ok(error is None, info):
            raise error or UserError("data preparation failed on another rank; see its message")
        if root is None:
            root = locate_dataset(data.dataset, data.root, data.cache_dir, download=False)
        train, test = load_dataset(data.dataset, root)
        val = None
        if data.val_size:
            train, val = hold_out(train, data.val_size, VAL_SEED)
        return Splits(train, val, test)

    def train_batches(self, split: Split) -> TrainBatches:
        device, resident = self.info.device, self.cfg.data.device_resident
        if resident == "true" or (resident == "auto" and device.type == "cuda"):
            split = split.to(device)
        return TrainBatches(
            split,
            global_batch_size=self.cfg.train.global_batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=self.cfg.seed,
            device=device,
            transform=self.view.to(device),
        )

    def loss(self, model: nn.Module, batch: Any, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        x, y = batch
        with autocast:
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    @torch.no_grad()
    def evaluate(
        self, module: nn.Module, split: Split, autocast: contextlib.AbstractContextManager, detail: bool = False
    ) -> dict[str, Any]:
        """Mean cross-entropy and accuracy over every sample (none dropped, none twice).

        ``detail`` adds ``confusion`` ([true, predicted] counts) and ``predictions`` (CPU, in order).
        """
        device = self.info.device
        classes = int(getattr(module, "args", {}).get("num_classes", 10))
        was_training = module.training
        module.eval()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        confusion = torch.zeros(classes * classes, device=device, dtype=torch.long)
        preds: list[torch.Tensor] = []
        seen = 0
        for x, y in eval_batches(split, self.cfg.eval.batch_size, device, self.view.to(device)):
            with autocast:
                logits = module(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            pred = logits.argmax(dim=1)
            correct += (pred == y).sum()
            if detail:
                confusion += torch.bincount(y * classes + pred, minlength=classes * classes)
                preds.append(pred.cpu())
            seen += len(y)
        module.train(was_training)
        result: dict[str, Any] = {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, "samples": seen}
        if detail:
            result["confusion"] = confusion.view(classes, classes).cpu()
            result["predictions"] = torch.cat(preds)
        return result

    # Where the files are, not what they hold (the data set, view and split must stay: rnnddp/resume.py).
    RESUME_SAFE = ("data.root", "data.cache_dir", "data.download", "data.device_resident")

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        super().check_resume(state, path)
        saved = (state.get("config") or {}).get("data", {})
        perm, saved_perm = self.view.permutation, state.get("permutation")
        if perm is not None and (saved_perm is None or not torch.equal(saved_perm, perm)):
            raise UserError(
                f"checkpoint {path} used another pixel permutation; set data.permutation_seed="
                f"{saved.get('permutation_seed')} or start a new run with another name="
            )

    def check_restorable(self, saved_args: dict, path: Path) -> None:
        wanted = saved_args.get("input_size")
        if saved_args.get("name", "rnn") == "rnn" and wanted != self.view.input_size:
            raise UserError(
                f"checkpoint {path} expects {wanted} features per step; data.view={self.view.name} "
                f"gives {self.view.input_size}; leave data.view as the checkpoint has it"
            )

    def state_dict(self) -> dict[str, Any]:
        # evaluate and predict reuse this exact order, whatever the seed would give them.
        return {"permutation": self.view.permutation} if self.view.permutation is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.view.permutation is not None and state.get("permutation") is not None:
            self.view = ImageView(self.view.name, state["permutation"], self.view.mean, self.view.std)

    def pictures(self, result: dict[str, Any], split: Split) -> dict[str, Picture]:
        conf, preds = result["confusion"], result["predictions"]
        return {
            "confusion_matrix": lambda out: plots.confusion_matrix(conf, out),
            "test_digits": lambda out: plots.digit_grid(split.inputs, split.targets, preds, out),
        }

    def describe(self) -> str:
        m = self.cfg.model
        rnn = f"{'bi' if m.bidirectional else ''}{m.cell}-{m.hidden_size}x{m.num_layers}"
        net = "cnn" if m.name == "cnn" else rnn
        return f"{net}, view {self.cfg.data.view}, data set {self.cfg.data.dataset}"

    def report(self, result: dict[str, Any], split: Split) -> list[str]:
        return per_class_report(result, [str(c) for c in range(len(result["confusion"]))], "images")

    @torch.no_grad()
    def predict(self, module: nn.Module, files: list[str], path: Path) -> list[str]:
        """``file  label  probability`` per image, through the checkpoint's view (and permutation)."""
        pixels = torch.stack([load_image(f) for f in files])
        probs = torch.softmax(module(self.view(pixels)).float(), dim=1)
        conf, labels = probs.max(dim=1)
        return [f"{f}\t{int(y)}\t{float(c):.4f}" for f, y, c in zip(files, labels, conf, strict=True)]

    def serving(self) -> Serving:
        v = self.view
        images = Tensor(
            "images",
            "uint8",
            ["batch", 28, 28],
            "28x28 grayscale digits, bright on dark as MNIST (invert paper scans)",
            256,
        )
        prepare = {"scale": "x / 255", "view": v.name, "permuted": v.permutation is not None}
        if v.mean is not None:
            prepare.update(mean=v.mean, std=v.std)
        meta = {"classes": [str(k) for k in range(10)], "preparation_in_graph": prepare}
        return Serving(v.module(), images, lengths=False, meta=meta)
