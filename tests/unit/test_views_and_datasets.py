"""The model family (RNN cells, CNN), the sequence views and the MNIST-like data sets, at unit level."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import from_saved, load_config, to_dict
from rnnddp.data.batches import Split, TrainBatches, eval_batches
from rnnddp.data.mnist import MNIST_FILES, load_dataset, locate_dataset
from rnnddp.data.views import ImageView, input_size, make_permutation
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.evaluate import restore
from rnnddp.models import ConvClassifier, SequenceClassifier, build_model, classifier_args
from rnnddp.tasks import TASKS
from tests.idx_files import random_images, write_idx

VIEWS = ["rows", "columns", "pixels", "permuted_pixels"]
MODELS = {  # config overrides -> the tiny model under test
    "lstm": ["model.cell=lstm", "model.hidden_size=8"],
    "gru2": ["model.cell=gru", "model.hidden_size=8", "model.num_layers=2", "model.dropout=0.1"],
    "birnn": ["model.cell=rnn", "model.hidden_size=8", "model.bidirectional=true"],
    "cnn": ["model.name=cnn"],
}


def _split(n: int) -> Split:
    return Split(random_images(n), torch.arange(n) % 10)


# -- views ----------------------------------------------------------------------------------------


def test_views_shapes_and_values():
    img = random_images(3)
    x = img.float() / 255
    assert torch.equal(ImageView("rows")(img), x)
    assert torch.equal(ImageView("columns")(img), x.transpose(1, 2))
    pixels = ImageView("pixels")(img)
    assert pixels.shape == (3, 784, 1) and torch.equal(pixels[:, :, 0], x.reshape(3, 784))
    perm = make_permutation(7)
    permuted = ImageView("permuted_pixels", perm)(img)
    assert permuted.shape == (3, 784, 1)
    assert torch.equal(permuted[:, :, 0], x.reshape(3, 784)[:, perm])
    assert sorted(perm.tolist()) == list(range(784))
    assert input_size("rows") == input_size("columns") == 28 and input_size("pixels") == 1


def test_permutation_is_a_function_of_the_seed_alone():
    # Every rank draws it itself: it must not depend on the global RNG state.
    torch.manual_seed(1)
    a = make_permutation(3)
    torch.manual_seed(2)
    torch.rand(10)
    assert torch.equal(a, make_permutation(3))
    assert not torch.equal(a, make_permutation(4))


def test_train_and_eval_batches_apply_the_view():
    split = _split(64)
    perm = make_permutation(0)
    tb = TrainBatches(
        split,
        global_batch_size=16,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("cpu"),
        transform=ImageView("permuted_pixels", perm),
    )
    x, y = next(tb.epoch(0))
    i = tb.indices(0)[0]
    assert x.shape == (16, 784, 1)
    assert torch.equal(x[:, :, 0], split.inputs[i].float().reshape(16, 784)[:, perm] / 255)
    xs = [x for x, _ in eval_batches(split, 50, torch.device("cpu"), ImageView("columns"))]
    assert [t.shape for t in xs] == [(50, 28, 28), (14, 28, 28)]
    assert torch.equal(xs[0][0], split.inputs[0].float().t() / 255)


def test_cnn_needs_a_two_d_view():
    for view in ("pixels", "permuted_pixels"):
        with pytest.raises(UserError, match="model.name=cnn needs a 2-D image: data.view must be rows or columns"):
            load_config(["model.name=cnn", f"data.view={view}"])
    assert load_config(["model.name=cnn", "data.view=columns"]).data.view == "columns"
    with pytest.raises(UserError, match="choose one of rows, columns, pixels, permuted_pixels"):
        load_config(["data.view=diagonal"])


# -- every model under every view: shapes, gradients, save and reload through evaluate -------------


def _combos() -> list[tuple[str, str]]:
    return [(m, v) for m in MODELS for v in VIEWS if not (m == "cnn" and v not in ("rows", "columns"))]


@pytest.mark.parametrize("model_key,view", _combos())
def test_model_view_forward_backward_save_and_reload(model_key: str, view: str, tmp_path: Path):
    cfg = load_config([*MODELS[model_key], f"data.view={view}", "data.permutation_seed=5", "eval.batch_size=16"])
    args = classifier_args(cfg.model, input_size=input_size(view))
    torch.manual_seed(0)
    model = build_model(args)
    assert isinstance(model, ConvClassifier if model_key == "cnn" else SequenceClassifier)
    # A stored order that data.permutation_seed=5 would not give: evaluate must use the stored one.
    perm = make_permutation(99) if view == "permuted_pixels" else None
    split = _split(40)
    x = ImageView(view, perm)(split.inputs[:6])
    assert x.shape == ((6, 28, 28) if view in ("rows", "columns") else (6, 784, 1))
    logits = model(x)
    assert logits.shape == (6, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    # Save as the job does (plain types and tensors only), reload through evaluate.restore.
    state = {"model": model.state_dict(), "model_args": args, "config": to_dict(cfg), "global_step": 1}
    if perm is not None:
        state["permutation"] = perm
    path = CheckpointManager(tmp_path).save(state, 1)
    torch.load(path, weights_only=True)  # loadable without unpickling code
    restored = restore(tmp_path, [])  # a run directory: its latest checkpoint
    assert restored.path == path and restored.cfg.data.view == view
    if perm is not None:
        assert torch.equal(restored.task.view.permutation, perm)
    task = TASKS["classify"](cfg, DistInfo())
    task.view = ImageView(view, perm)
    autocast = contextlib.nullcontext()
    before = task.evaluate(model, split, autocast, detail=True)
    after = restored.task.evaluate(restored.module, split, autocast, detail=True)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert after["accuracy"] == before["accuracy"]
    assert torch.equal(after["confusion"], before["confusion"]) and after["confusion"].sum() == 40


def test_old_checkpoints_without_new_keys_rebuild_as_rnn_rows():
    # A checkpoint from before model.name / data.view existed: model_args without "name",
    # a config without the new keys. It still matches the default config and rebuilds.
    old_args = dict(
        cell="lstm", input_size=28, hidden_size=128, num_layers=1, dropout=0.0, bidirectional=False, num_classes=10
    )
    assert classifier_args(load_config([]).model) == old_args
    assert isinstance(build_model(old_args), SequenceClassifier)
    saved = to_dict(load_config([]))
    del saved["data"]["view"], saved["data"]["permutation_seed"], saved["model"]["name"]
    cfg = from_saved(saved, ["data.root=/elsewhere"])
    assert cfg.data.view == "rows" and cfg.model.name == "rnn" and cfg.data.root == "/elsewhere"


def test_old_sine_keys_are_read_from_their_old_place():
    # Before the sine task had its own section, its keys lived under data (and data.num_workers existed).
    saved = to_dict(load_config(["task=sine_regression"]))
    del saved["sine"]
    saved["data"].update(sine_sequences=64, sine_test_sequences=8, sine_length=40, chunk_len=5, num_workers=0)
    cfg = from_saved(saved, [])
    assert (cfg.sine.sequences, cfg.sine.test_sequences, cfg.sine.length, cfg.sine.chunk_len) == (64, 8, 40, 5)
    assert cfg.sine.val_sequences == 256  # new since: its default


# -- Fashion-MNIST and KMNIST on tiny IDX files ----------------------------------------------------


@pytest.mark.parametrize("dataset,folder", [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_other_data_sets_from_idx_files(dataset: str, folder: str, tmp_path: Path):
    train, test = write_idx(tmp_path / "root" / folder / "raw")
    root = locate_dataset(dataset, str(tmp_path / "root"), cache_dir=str(tmp_path / "cache"), download=False)
    assert root == tmp_path / "root"
    got_train, got_test = load_dataset(dataset, root)
    assert torch.equal(got_train.inputs, train.inputs) and torch.equal(got_train.targets, train.targets)
    assert torch.equal(got_test.inputs, test.inputs) and len(got_test) == 50


@pytest.mark.parametrize("dataset,folder", [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_other_data_sets_gz_only_read_only_folder_is_extracted(dataset: str, folder: str, tmp_path: Path):
    src = tmp_path / "ro" / folder / "raw"
    train, _ = write_idx(src, gz=True)
    os.chmod(src, 0o555)
    try:
        root = locate_dataset(dataset, str(tmp_path / "ro"), cache_dir=str(tmp_path / "cache"), download=False)
        assert root == tmp_path / "cache"
        assert sorted(os.listdir(tmp_path / "cache" / folder / "raw")) == sorted(MNIST_FILES)
        assert torch.equal(load_dataset(dataset, root)[0].inputs, train.inputs)
        assert sorted(os.listdir(src)) == sorted(n + ".gz" for n in MNIST_FILES)  # source untouched
    finally:
        os.chmod(src, 0o755)


def test_bad_idx_in_gz_is_named_and_not_extracted(tmp_path: Path):
    src = tmp_path / "KMNIST" / "raw"
    write_idx(src, gz=True)
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 0x00000803, 10, 32, 32) + bytes(10 * 32 * 32))  # not 28x28
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz is corrupt \(expected 10 images of 28x28"):
        locate_dataset("kmnist", str(tmp_path), cache_dir=str(tmp_path / "cache"), download=False)
    assert not (tmp_path / "cache" / "KMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_missing_other_data_set_offline_is_one_line(tmp_path: Path):
    with pytest.raises(UserError) as e:
        locate_dataset("fashion_mnist", str(tmp_path), cache_dir=str(tmp_path / "cache"), download=False)
    assert str(e.value).startswith(f"FashionMNIST not found in {tmp_path / 'FashionMNIST' / 'raw'}")
    assert "\n" not in str(e.value)


def test_plots_from_metrics_confusion_and_predictions(tmp_path: Path):
    from rnnddp import plots
    from rnnddp.metrics import kept_records
    from rnnddp.plots import write_plots

    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 10, "train/loss": 2.0},
        {"step": 20, "train/loss": 1.0},
        {"step": 20, "val/loss": 0.9, "val/accuracy": 0.7},
        {"step": 30, "train/loss": 0.8},  # lost in a crash: the resume at 20 voids it
        {"step": 20, "event": "resume", "checkpoint": "x"},
        {"step": 30, "train/loss": 0.7},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r.get("train/loss") for r in kept_records(metrics)] == [2.0, 1.0, None, 0.7]
    split = _split(100)
    preds = split.targets.clone()
    preds[:7] = (preds[:7] + 1) % 10
    confusion = torch.bincount(split.targets * 10 + preds, minlength=100).view(10, 10)
    task = TASKS["classify"](load_config([]), DistInfo())
    pictures = task.pictures({"confusion": confusion, "predictions": preds}, split)
    written = write_plots(tmp_path / "plots", pictures, metrics_path=metrics, metric=task.metric, prefix="x_")
    assert sorted(written) == ["confusion_matrix", "learning_curves", "test_digits"]
    assert all(p.stat().st_size > 1000 and p.name.startswith("x_") for p in written.values())
    # Unwritable target: a warning and nothing written, never an exception.
    (tmp_path / "file").write_text("")
    drawn = {"confusion_matrix": lambda out: plots.confusion_matrix(confusion, out)}
    assert write_plots(tmp_path / "file" / "plots", drawn) == {}


def test_damaged_gz_is_one_line_and_leaves_no_partial_file(tmp_path: Path):
    src = tmp_path / "FashionMNIST" / "raw"
    write_idx(src, gz=True)
    data = (src / "t10k-images-idx3-ubyte.gz").read_bytes()
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(UserError, match=r"is damaged .*replace it with a good copy") as e:
        locate_dataset("fashion_mnist", str(tmp_path), cache_dir=str(tmp_path / "cache"), download=False)
    assert "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "cache" / "FashionMNIST" / "raw").iterdir() if p.name.startswith("t10k-images")]


def test_mnist_files_under_another_data_set_are_refused(tmp_path: Path, mnist_root):
    # data.root pointing at MNIST's .gz folder with data.dataset=kmnist would train on MNIST.
    with pytest.raises(UserError, match="it is MNIST's file, not KMNIST's"):
        locate_dataset("kmnist", str(mnist_root / "MNIST" / "raw"), cache_dir=str(tmp_path / "c"), download=False)
