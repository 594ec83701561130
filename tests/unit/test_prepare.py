"""rnnddp-prepare on the real JapaneseVowels files and on broken ones: the prepared folder, memory-mapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnddp.data.readers import read_ts
from rnnddp.data.sequences import FORMAT_VERSION, open_prepared
from rnnddp.errors import UserError
from rnnddp.prepare import main
from tests.conftest import DATA_ROOT, REPO

JV = DATA_ROOT / "UEA" / "JapaneseVowels"


@pytest.fixture(scope="module")
def vowels() -> Path:
    if not (JV / "JapaneseVowels_TRAIN.ts").is_file():
        if os.environ.get("RNNDDP_REQUIRE_DATA"):
            pytest.fail(f"JapaneseVowels not found under {JV}")
        pytest.skip(f"JapaneseVowels not found under {JV}")
    return JV


def test_japanese_vowels_prepares_with_a_stratified_validation_split(vowels: Path, tmp_path: Path) -> None:
    out = tmp_path / "jv"
    train_ts, test_ts = vowels / "JapaneseVowels_TRAIN.ts", vowels / "JapaneseVowels_TEST.ts"
    assert main(["--train", str(train_ts), "--test", str(test_ts), "--out", str(out)]) == 0
    data = open_prepared(out)
    m = data.manifest
    assert m["features"] == 12 and m["classes"] == [str(c) for c in range(1, 10)] and m["target"] == "label"
    assert m["splits"]["test"]["sequences"] == 370 and (
        m["splits"]["test"]["min_length"],
        m["splits"]["test"]["max_length"],
    ) == (7, 29)
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    assert len(train) + len(val) == 270
    assert np.bincount(val.labels).tolist() == [6] * 9  # 20% of each speaker's 30
    assert isinstance(train.features, np.memmap)  # mapped, not read
    assert test.features.flags.c_contiguous  # row-major: a sequence is one range of the file, one read call
    # Statistics from the train split alone (validation carved out first), per feature.
    np.testing.assert_allclose(m["mean"], train.features.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(m["mean"], np.concatenate([train.features, val.features]).mean(axis=0), atol=1e-6)
    # The test split holds the file's sequences in order, each intact.
    raw = read_ts(test_ts)
    for i in (0, 123, 369):
        np.testing.assert_array_equal(test.sequence(i), raw.features[i])
        np.testing.assert_array_equal(test.read_sequence(i), raw.features[i])  # the batches' read call
        assert data.class_names[test.labels[i]] == raw.labels[i]
    # The same draw every time.
    again = tmp_path / "jv2"
    assert main(["--train", str(train_ts), "--test", str(test_ts), "--out", str(again)]) == 0
    np.testing.assert_array_equal(open_prepared(again).split("val").offsets, val.offsets)


TS_HEAD = "@problemName t\n@missing false\n@univariate false\n@dimensions 2\n@equalLength false\n@classLabel true a b\n@data\n"
GOOD = ["1,2,3:4,5,6:a", "1,2:3,4:b", "5,6,7:8,9,1:a", "2,3:4,5:b"]


def _ts(path: Path, lines: list[str], head: str = TS_HEAD) -> Path:
    path.write_text(head + "\n".join(lines) + "\n")
    return path


def _fails(tmp_path: Path, capsys, train: Path, test: Path, *more: str) -> str:
    out = tmp_path / "out"
    code = main(["--train", str(train), "--test", str(test), "--out", str(out), *more])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    return err


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ("1,2,3:4,5,6:7,8,9:a", "train.ts:9: 3 channels, but @dimensions is 2"),
        ("1,2,3:4,5,6", "train.ts:9: no class label"),
        ("1,?,3:4,5,6:a", "train.ts:9: a missing value"),
        (":4,5,6:a", "train.ts:9: channel 1 is empty"),
        ("1,2,3:4,x,6:a", "train.ts:9: channel 2 has 'x'"),
        ("1,2,3:4,5,6:c", "train.ts:9: class label 'c' is not in @classLabel"),
    ],
)
def test_a_malformed_ts_line_is_one_line_naming_file_and_line(tmp_path: Path, capsys, line: str, expect: str) -> None:
    train = _ts(tmp_path / "train.ts", [GOOD[0], line, *GOOD[1:]])
    test = _ts(tmp_path / "test.ts", GOOD)
    assert expect in _fails(tmp_path, capsys, train, test)


def test_splits_that_disagree_are_refused(tmp_path: Path, capsys) -> None:
    train = _ts(tmp_path / "train.ts", GOOD)
    three = TS_HEAD.replace("@dimensions 2", "@dimensions 3")
    test = _ts(tmp_path / "test.ts", ["1:2:3:a", "4:5:6:b"], three)
    assert "3 features per step, but the train file" in _fails(tmp_path, capsys, train, test)
    np.savez(tmp_path / "tr.npz", x=np.ones((4, 3, 2)), y=np.array([0, 0, 1, 1]))
    np.savez(tmp_path / "te.npz", x=np.ones((2, 3, 2)), y=np.array([0, 2]))
    assert "class(es) 2 never occur in the train file" in _fails(
        tmp_path, capsys, tmp_path / "tr.npz", tmp_path / "te.npz"
    )
    np.savez(tmp_path / "bad.npz", x=np.ones((2, 3, 2)))
    assert "no array 'y'" in _fails(tmp_path, capsys, tmp_path / "tr.npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((2, 3, 2), np.nan), y=np.array([0, 1]))
    assert "record 0: NaN" in _fails(tmp_path, capsys, tmp_path / "tr.npz", tmp_path / "nan.npz")


def test_npz_of_variable_length_and_per_step_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.empty(10, dtype=object)
    y = np.empty(10, dtype=object)
    for i in range(10):
        x[i] = rng.normal(size=(3 + i, 4)).astype(np.float32)
        y[i] = (np.arange(3 + i) % 3).astype(np.int64)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    assert (
        main(["--train", str(tmp_path / "a.npz"), "--test", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o")]) == 0
    )
    data = open_prepared(tmp_path / "o")
    assert data.per_step and data.feature_count == 4 and data.class_names == ["0", "1", "2"]
    test = data.split("test")
    assert test.lengths.tolist() == list(range(3, 13)) and len(test.targets) == test.offsets[-1]
    np.testing.assert_array_equal(test.sequence(4), x[4])


def test_an_existing_out_folder_another_version_and_a_plain_folder_are_refused(tmp_path: Path, capsys) -> None:
    train = _ts(tmp_path / "train.ts", GOOD)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["--train", str(train), "--test", str(train), "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a prepared data set.*rnnddp-prepare"):
        open_prepared(tmp_path / "out")
    assert main(["--train", str(train), "--test", str(train), "--out", str(tmp_path / "p")]) == 0
    manifest = tmp_path / "p" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}"):
        open_prepared(tmp_path / "p")


def test_the_console_command_exits_2_on_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rnnddp.prepare", "--train", str(tmp_path / "none.ts"), "--test", "x.ts", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
