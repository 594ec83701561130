"""evaluate and predict from the command line: on tiny checkpoints (fast) and a short real run (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config, to_dict
from rnnddp.data.images import load_image
from rnnddp.data.mnist import load_dataset, locate_dataset
from rnnddp.models import build_model, classifier_args
from tests.conftest import REPO, final_eval, job_env, read_metrics, run_cli, run_job
from tests.idx_files import write_idx


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    cfg = load_config(["model.hidden_size=4"])
    args = classifier_args(cfg.model)
    CheckpointManager(tmp_path / "run").save(
        {"model": build_model(args).state_dict(), "model_args": args, "config": to_dict(cfg), "global_step": 0}, 0
    )
    return tmp_path / "run"


def test_non_image_file_is_one_line_naming_it_exit_2(tiny_run: Path, tmp_path: Path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")
    good = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(good)
    proc = run_cli("rnnddp.predict", tiny_run, good, bad)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {bad} is not an image (PNG, JPEG or another format Pillow reads)"], proc.stderr
    assert proc.stdout == ""  # nothing printed for the good file either: inputs are checked first
    missing = run_cli("rnnddp.predict", tiny_run, tmp_path / "nope.jpg")
    assert missing.returncode == 2 and str(tmp_path / "nope.jpg") in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_predict_prints_file_label_probability(tiny_run: Path, tmp_path: Path):
    img = tmp_path / "x.png"
    Image.new("L", (40, 60), color=255).save(img)
    proc = run_cli("rnnddp.predict", tiny_run, img)
    assert proc.returncode == 0, proc.stderr
    path, label, prob = proc.stdout.strip().split("\t")
    assert path == str(img) and 0 <= int(label) <= 9 and 0.0 < float(prob) <= 1.0


def test_images_are_grayscale_28x28_with_mnist_polarity(tmp_path: Path):
    digit = torch.zeros(28, 28, dtype=torch.uint8)
    digit[6:22, 12:16] = 255  # a bright stroke on black, like MNIST
    Image.fromarray(digit.numpy()).save(tmp_path / "mnist_like.png")
    assert torch.equal(load_image(tmp_path / "mnist_like.png"), digit)
    # A dark digit on white paper, in colour and larger: inverted back, resized to 28x28.
    paper = ImageOps.invert(Image.fromarray(digit.numpy())).resize((112, 112), Image.Resampling.NEAREST)
    paper.convert("RGB").save(tmp_path / "paper.jpg", quality=95)
    got = load_image(tmp_path / "paper.jpg")
    assert got.shape == (28, 28) and got.dtype == torch.uint8
    assert (got.float() - digit.float()).abs().mean() < 10


def test_evaluate_cli_bad_input_is_one_line(tmp_path: Path):
    for args in ([tmp_path / "missing.pt"], [tmp_path]):  # no file; a folder without checkpoints
        proc = run_cli("rnnddp.evaluate", *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, mnist_root) -> Path:
    # The seed config for 400 steps on one process: ~91-94% in about 15 s on 2 cores.
    run = tmp_path_factory.mktemp("real") / "seed"
    run_job(
        [
            "--config",
            "configs/seed_lstm.yaml",
            f"data.root={mnist_root}",
            "train.max_steps=400",
            "wandb.mode=disabled",
            f"run_dir={run}",
        ]
    )
    return run


@pytest.mark.slow
def test_evaluate_reproduces_the_logged_accuracy(real_run: Path, mnist_root):
    logged = final_eval(real_run)["test/accuracy"]
    assert logged > 0.9
    proc = run_cli("rnnddp.evaluate", real_run, f"data.root={mnist_root}")
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy {logged:.4f}  (10000 images)" in proc.stdout, proc.stdout
    per_class = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(per_class) == 10


@pytest.mark.slow
def test_predict_classifies_real_test_digits(real_run: Path, mnist_root, tmp_path: Path):
    _, test = load_dataset("mnist", locate_dataset("mnist", str(mnist_root), download=False))
    files, labels = [], []
    for i in range(3):  # a 7, a 2 and a 1
        img = Image.fromarray(test.inputs[i].numpy())
        img.save(tmp_path / f"test{i}.png")
        # The same digit as a scan would give it: dark on white, larger, RGB JPEG.
        ImageOps.invert(img).resize((140, 140)).convert("RGB").save(tmp_path / f"scan{i}.jpg", quality=95)
        files += [tmp_path / f"test{i}.png", tmp_path / f"scan{i}.jpg"]
        labels += [int(test.targets[i])] * 2
    proc = run_cli("rnnddp.predict", real_run / "checkpoints" / "best.pt", *files)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == [str(f) for f in files]
    assert [int(r[1]) for r in rows] == labels, proc.stdout
    assert all(float(r[2]) > 0.5 for r in rows)


def test_evaluate_refuses_a_view_the_model_cannot_read(tiny_run: Path):
    proc = run_cli("rnnddp.evaluate", tiny_run, "data.view=pixels")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {tiny_run / 'checkpoints' / 'step_0000000.pt'} expects 28 features per step; "
        "data.view=pixels gives 1; leave data.view as the checkpoint has it"
    ]


def test_kmnist_job_trains_and_evaluates_on_tiny_files(tmp_path: Path):
    # The whole job path (locate, load, view, train, checkpoint, evaluate CLI) on a non-MNIST set.
    write_idx(tmp_path / "data" / "KMNIST" / "raw", n_train=256, n_test=60)
    run = tmp_path / "run"
    args = ["data.dataset=kmnist", f"data.root={tmp_path / 'data'}", "data.view=columns", "model.hidden_size=8"]
    args.append("data.val_size=64")  # 192 training images left: 3 steps of 64
    run_job(
        [
            *args,
            "train.global_batch_size=64",
            "train.epochs=1",
            "wandb.mode=offline",
            "eval.plots=true",
            f"run_dir={run}",
        ]
    )
    pictures = ["learning_curves.png", "confusion_matrix.png", "test_digits.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(pictures)
    logged_images = sorted(p.name.split("_3_")[0] for p in (run / "wandb").rglob("media/images/plots/*.png"))
    assert logged_images == sorted(p.removesuffix(".png") for p in pictures)  # also W&B images, at step 3
    logged = final_eval(run)["test/accuracy"]
    assert [m["step"] for m in read_metrics(run) if "val/accuracy" in m] == [3]
    proc = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(run)], env=job_env(), cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "view columns, data set kmnist" in proc.stdout
    assert f"accuracy {logged:.4f}  (60 images)" in proc.stdout
    assert (run / "plots" / "step_0000003_confusion_matrix.png").is_file()  # evaluate's own pictures
