"""Per-step targets: prepared from .npz (classes or values at every step), a loss that is the same on
1 or N ranks, the task that fits a folder, and the sequence files rnnddp-predict reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rnnddp.config import load_config
from rnnddp.data.readers import read_sequence_file, read_sequences
from rnnddp.data.sequences import IGNORE, open_prepared
from rnnddp.dist import DistInfo
from rnnddp.errors import UserError
from rnnddp.models import initial_model
from rnnddp.prepare import main, prepare
from rnnddp.tasks import TASKS
from tests.sequence_files import step_sequences, write_step_files


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("steps")
    out = {}
    for kind in ("classes", "values"):
        train, test = write_step_files(root, kind, train=200, test=50)
        out[kind] = prepare(train, test, root / kind)
    return out


def test_per_step_classes_and_values_are_prepared_with_their_kind(folders: dict[str, Path]) -> None:
    classes, values = open_prepared(folders["classes"]), open_prepared(folders["values"])
    assert classes.target_kind == "per_step" and classes.class_names == ["high", "low", "mid"]
    assert values.target_kind == "per_step_value" and values.manifest["outputs"] == 2 and values.class_names == []
    x, y = step_sequences(50, 1, "classes")
    test = classes.split("test")
    assert test.targets.dtype == np.int64 and len(test.targets) == test.offsets[-1]
    for i in (0, 17, 49):
        np.testing.assert_array_equal(test.sequence(i), x[i])
        assert [classes.class_names[c] for c in test.step_targets(i)] == y[i].tolist()
    _, v = step_sequences(50, 1, "values")
    vt = values.split("test")
    assert vt.targets.dtype == np.float32 and vt.targets.shape == (vt.offsets[-1], 2)
    np.testing.assert_array_equal(vt.step_targets(7), v[7])
    train = values.split("train")  # the scale of the error: always predicting the train split's mean
    np.testing.assert_allclose(values.manifest["target_mean"], train.targets.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize(
    ("task", "folder", "expect"),
    [
        ("sequence_classification", "classes", "holds a class at every step; train it with task=step_classification"),
        ("step_classification", "values", "holds values at every step; train it with task=step_regression"),
        ("step_regression", "classes", "holds a class at every step; train it with task=step_classification"),
    ],
)
def test_a_folder_of_another_target_names_the_task_that_fits(folders, task: str, folder: str, expect: str) -> None:
    cfg = load_config([f"task={task}", f"sequences.path={folders[folder]}", "wandb.mode=disabled"])
    with pytest.raises(UserError, match=expect):
        TASKS[task](cfg, DistInfo())


def _task(folders, kind: str, rank: int, world: int, extra: list[str]):
    name = {"classes": "step_classification", "values": "step_regression"}[kind]
    args = [f"task={name}", f"sequences.path={folders[kind]}", "train.global_batch_size=16", "wandb.mode=disabled"]
    return TASKS[name](load_config([*args, *extra]), DistInfo(rank=rank, world_size=world))


@pytest.mark.parametrize("kind", ["classes", "values"])
def test_the_gradient_of_a_step_is_the_same_on_one_rank_and_split_over_two(folders, kind: str) -> None:
    """DDP averages the ranks' gradients; the per-step loss divides by the global batch's real steps,
    so the average equals one rank's gradient of the whole batch, though the ranks' shares hold
    different numbers of steps (random batches here: very different)."""
    extra = ["sequences.bucket=false", "model.hidden_size=8"]
    one, halves = _task(folders, kind, 0, 1, extra), [_task(folders, kind, r, 2, extra) for r in (0, 1)]
    model = initial_model(one.model_args(), seed=0)

    def grads(task) -> tuple[list[torch.Tensor], int]:
        batch = next(task.train_batches(task.load().train).epoch(3))
        model.zero_grad()
        task.loss(model, batch, torch.autocast("cpu", enabled=False)).backward()
        return [p.grad.clone() for p in model.parameters()], int(batch.lengths.sum())

    whole, _ = grads(one)
    (g0, n0), (g1, n1) = grads(halves[0]), grads(halves[1])
    assert n0 != n1  # the shares differ in real steps: a per-rank mean would weigh them wrongly
    for w, a, b in zip(whole, g0, g1, strict=True):
        torch.testing.assert_close((a + b) / 2, w, rtol=1e-4, atol=1e-6)


def test_padding_steps_carry_no_target(folders) -> None:
    task = _task(folders, "classes", 0, 1, [])
    batch = next(task.train_batches(task.load().train).epoch(0))
    real = torch.arange(batch.x.shape[1])[None, :] < batch.lengths[:, None]
    assert (batch.y[~real] == IGNORE).all() and (batch.y[real] >= 0).all()
    assert batch.global_steps == int(batch.lengths.sum())  # one rank: its share is the global batch


def _fails(tmp_path: Path, capsys, train: Path, test: Path) -> str:
    out = tmp_path / "out"
    code = main(["--train", str(train), "--test", str(test), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
    return err


def test_bad_per_step_files_are_one_line(tmp_path: Path, capsys) -> None:
    x, y = step_sequences(6, 0, "values")
    np.savez(tmp_path / "values.npz", x=x, y=y)
    xc, yc = step_sequences(6, 0, "classes")
    np.savez(tmp_path / "classes.npz", x=xc, y=yc)
    assert "its targets are a class at every step, the train file" in _fails(
        tmp_path, capsys, tmp_path / "values.npz", tmp_path / "classes.npz"
    )
    y[2] = y[2].copy()
    y[2][4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    assert "record 2: NaN or infinity in the per-step values" in _fails(
        tmp_path, capsys, tmp_path / "nan.npz", tmp_path / "values.npz"
    )
    y[2] = y[2][:-1]
    np.savez(tmp_path / "short.npz", x=x, y=y)
    assert "record 2: per-step targets of shape" in _fails(
        tmp_path, capsys, tmp_path / "short.npz", tmp_path / "values.npz"
    )
    yc[5] = np.array(["low", "mid", "never"] * 40)[: len(xc[5])]
    np.savez(tmp_path / "unseen.npz", x=xc, y=yc)
    assert "class(es) never never occur in the train file" in _fails(
        tmp_path, capsys, tmp_path / "classes.npz", tmp_path / "unseen.npz"
    )


def test_a_column_of_labels_is_one_label_per_sequence(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((4, 5, 2)), y=np.array([[0], [1], [0], [1]]))  # [N, 1]
    s = read_sequences(tmp_path / "a.npz")
    assert not s.per_step and s.labels == ["0", "1", "0", "1"]


def test_sequence_files_for_predict(tmp_path: Path) -> None:
    seq = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "a.npy", seq)
    (tmp_path / "b.csv").write_text("f0,f1,f2\n" + "\n".join(",".join(map(str, r)) for r in seq) + "\n")
    (tmp_path / "c.csv").write_text("\n".join(",".join(map(str, r)) for r in seq))
    for name in ("a.npy", "b.csv", "c.csv"):
        got = read_sequence_file(tmp_path / name, 3)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, seq)
    with pytest.raises(UserError, match="a.npy: 3 features per step, the model was trained on 12"):
        read_sequence_file(tmp_path / "a.npy", 12)
    # pandas' header of an unnamed frame (the column numbers), and a spreadsheet's byte-order mark
    (tmp_path / "p.csv").write_text("0,1,2\n" + "\n".join(",".join(map(str, r)) for r in seq))
    (tmp_path / "q.csv").write_text("\ufeff" + "\n".join(",".join(map(str, r)) for r in seq), encoding="utf-8")
    for name in ("p.csv", "q.csv"):
        np.testing.assert_array_equal(read_sequence_file(tmp_path / name, 3), seq)
    (tmp_path / "d.csv").write_text("1,2,3\n\n4,x,6\n")
    with pytest.raises(UserError, match="d.csv:3: not comma-separated numbers"):
        read_sequence_file(tmp_path / "d.csv", 3)
    with (tmp_path / "z.npy").open("wb") as f:
        np.savez(f, x=seq)  # an archive under a .npy name
    with pytest.raises(UserError, match="holds several arrays, not one sequence"):
        read_sequence_file(tmp_path / "z.npy", 3)
    (tmp_path / "e.txt").write_text("1,2,3\n")
    with pytest.raises(UserError, match="unknown format '.txt'"):
        read_sequence_file(tmp_path / "e.txt", 3)
    with pytest.raises(UserError, match="no such file"):
        read_sequence_file(tmp_path / "none.npy", 3)
