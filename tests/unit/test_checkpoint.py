import os
import pickle
from pathlib import Path

import pytest
import torch

from rnnddp import checkpoint
from rnnddp.checkpoint import CheckpointManager
from rnnddp.errors import UserError
from rnnddp.models import build_model


def _state(step: int) -> dict:
    model = build_model(
        dict(cell="lstm", input_size=28, hidden_size=8, num_layers=1, dropout=0.0, bidirectional=False, num_classes=10)
    )
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 28, 28)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "global_step": step,
        "rng": [{"torch": torch.get_rng_state()}],
    }


def test_round_trip_is_exact(tmp_path: Path):
    m = CheckpointManager(tmp_path, keep=2)
    state = _state(10)
    path = m.save(state, 10)
    assert path == tmp_path / "checkpoints" / "step_0000010.pt"
    assert m.find_latest() == path
    loaded = checkpoint.load(path)
    assert loaded["global_step"] == 10
    for k, v in state["model"].items():
        assert torch.equal(v, loaded["model"][k])
    assert loaded["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])


def test_keeps_newest_k_plus_best(tmp_path: Path):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(_state(1), 1, best=True)
    for step in (2, 3, 4):
        m.save(_state(step), step)
    names = sorted(p.name for p in m.dir.iterdir())
    assert names == [
        "best.pt",
        "best.pt.sha256",
        "latest",
        "step_0000003.pt",
        "step_0000003.pt.sha256",
        "step_0000004.pt",
        "step_0000004.pt.sha256",
    ]
    assert checkpoint.load(m.dir / "best.pt")["global_step"] == 1
    assert checkpoint.verify(m.dir / "best.pt") is None


def test_crash_during_save_leaves_latest_on_the_previous_file(tmp_path: Path, monkeypatch):
    m = CheckpointManager(tmp_path, keep=3)
    good = m.save(_state(1), 1)

    def dies(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(
        UserError, match="cannot write checkpoint .*step_0000002.pt .*No space left.*earlier checkpoints are untouched"
    ):
        m.save(_state(2), 2)
    assert m.find_latest() == good
    assert sorted(p.name for p in m.dir.iterdir()) == ["latest", "step_0000001.pt", "step_0000001.pt.sha256"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker"])
def test_damaged_newest_falls_back_to_previous(tmp_path: Path, damage, caplog):
    m = CheckpointManager(tmp_path, keep=3)
    good = m.save(_state(1), 1)
    newest = m.save(_state(2), 2)
    if damage == "truncate":
        os.truncate(newest, newest.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    else:  # killed between the rename and the commit marker
        Path(str(newest) + ".sha256").unlink()
    assert m.find_latest() == good
    assert "skipping checkpoint" in caplog.text and "step_0000002.pt" in caplog.text


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    torch.save({"model": _Payload(str(marker))}, tmp_path / "evil2.pt")
    marker.unlink(missing_ok=True)  # pickling itself does not run it, but be sure
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UserError, match="refusing to load|cannot read checkpoint"):
            checkpoint.load(p)
    assert not marker.exists()
