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
    assert "record 0: every value of the sequence is missing" in _fails(
        tmp_path, capsys, tmp_path / "tr.npz", tmp_path / "nan.npz"
    )


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


# Missing values: '?' (or NaN/inf in an .npz) at the end of every channel shorten a sequence; inside one
# they are refused unless --fill-missing fills them; the statistics are those of the real values only.
TS_MISSING = TS_HEAD.replace("@missing false", "@missing true")
INSIDE = (
    "missing value(s) inside the sequence (first: {unit} {c}, step {t}); only trailing ones shorten a sequence: "
    "fill them with rnnddp-prepare --fill-missing {{zero,previous}}, or fix the file"
)


def _real_stats(rows: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the real (finite) values of [T_i, F] sequences."""
    flat = np.concatenate([np.asarray(r, dtype=np.float64) for r in rows])
    return np.nanmean(flat, axis=0), np.nanstd(flat, axis=0)


def _prepare_ts(tmp_path: Path, lines: list[str], *more: str) -> Path:
    train = _ts(tmp_path / "train.ts", lines, TS_MISSING)
    out = tmp_path / "out"
    # --val: the train split is the whole file, so its statistics are checkable by hand.
    assert main(["--train", str(train), "--val", str(train), "--test", str(train), "--out", str(out), *more]) == 0
    return out


def test_trailing_missing_values_shorten_a_sequence_and_the_stats_are_of_real_values(tmp_path: Path) -> None:
    lines = ["1,2,3,?,?:4,5,6,?,?:a", "1,2:3,4:b", "5,6,7,8,?:8,9,1,2,?:a", "2,3,?:4,5,?:b"]
    data = open_prepared(_prepare_ts(tmp_path, lines))
    train = data.split("train")
    assert train.lengths.tolist() == [3, 2, 4, 2]
    real = [[[1, 4], [2, 5], [3, 6]], [[1, 3], [2, 4]], [[5, 8], [6, 9], [7, 1], [8, 2]], [[2, 4], [3, 5]]]
    for i, seq in enumerate(real):
        np.testing.assert_array_equal(train.sequence(i), np.array(seq, dtype=np.float32))
    mean, std = _real_stats(real)
    m = data.manifest
    assert np.isfinite(m["mean"]).all() and np.isfinite(m["std"]).all()
    np.testing.assert_allclose(m["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(m["std"], std, rtol=1e-6)
    assert m["splits"]["train"]["max_length"] == 4 and m["splits"]["train"]["steps"] == 11


@pytest.mark.parametrize(
    ("line", "first"),
    [
        ("1,?,3:4,5,6:a", (1, 2)),  # a gap followed by a real value in its channel
        ("1,2,?:4,5,6:a", (1, 3)),  # channel 1 ends before channel 2: its tail is inside the sequence
        ("1,2,3,?:?,5,6,?:a", (2, 1)),
    ],
)
def test_a_missing_value_inside_a_sequence_is_refused_naming_the_line_and_fill_missing(
    tmp_path: Path, capsys, line: str, first: tuple[int, int]
) -> None:
    train = _ts(tmp_path / "train.ts", [GOOD[0], line, *GOOD[1:]], TS_MISSING)
    err = _fails(tmp_path, capsys, train, _ts(tmp_path / "test.ts", GOOD))
    c, t = first
    assert err == f"error: {train}:9: 1 " + INSIDE.format(unit="channel", c=c, t=t)


def test_a_sequence_with_no_real_value_is_refused(tmp_path: Path, capsys) -> None:
    train = _ts(tmp_path / "train.ts", [GOOD[0], "?,?:?,?:a", *GOOD[1:]], TS_MISSING)
    err = _fails(tmp_path, capsys, train, _ts(tmp_path / "test.ts", GOOD), "--fill-missing", "zero")
    assert err == f"error: {train}:9: every value of the sequence is missing; drop it from the file"
    train = _ts(tmp_path / "train.ts", [GOOD[0], "?,?:1,2:a", *GOOD[1:]], TS_MISSING)
    err = _fails(tmp_path, capsys, train, _ts(tmp_path / "test.ts", GOOD), "--fill-missing", "previous")
    assert err == (
        f"error: {train}:9: channel 1 has no real value, so --fill-missing previous has none to carry; "
        "give --fill-missing zero or fix the file"
    )


@pytest.mark.parametrize(
    ("mode", "filled"),
    [
        # previous: the channel's last real value; a leading gap takes the first real value after it.
        ("previous", [[2, 5], [2, 5], [2, 7], [4, 8]]),
        ("zero", [[0, 5], [2, 0], [0, 7], [4, 8]]),
    ],
)
def test_fill_missing_fills_inside_gaps_and_the_stats_stay_those_of_real_values(
    tmp_path: Path, mode: str, filled: list[list[float]]
) -> None:
    lines = ["?,2,?,4,?:5,?,7,8,?:a", "1,2:3,4:b", "5,6,7:8,9,1:a", "2,3:4,5:b"]
    data = open_prepared(_prepare_ts(tmp_path, lines, "--fill-missing", mode))
    train = data.split("train")
    assert train.lengths.tolist() == [4, 2, 3, 2]  # the trailing '?' still shortens the first
    np.testing.assert_array_equal(train.sequence(0), np.array(filled, dtype=np.float32))
    nan = float("nan")
    real = [[[nan, 5], [2, nan], [nan, 7], [4, 8]], [[1, 3], [2, 4]], [[5, 8], [6, 9], [7, 1]], [[2, 4], [3, 5]]]
    mean, std = _real_stats(real)
    np.testing.assert_allclose(data.manifest["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(data.manifest["std"], std, rtol=1e-6)
    assert data.manifest["source"]["fill_missing"] == mode


def test_npz_nan_rows_at_the_end_shorten_and_nan_inside_is_refused_or_filled(tmp_path: Path, capsys) -> None:
    x = np.full((3, 5, 2), np.nan, dtype=np.float32)
    x[0] = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    x[1, :3] = [[1, 1], [2, 2], [3, 3]]
    x[2, :2] = [[4, 4], [np.inf, 5]]  # infinity counts as missing too
    y = np.full((3, 5), np.nan, dtype=np.float32)  # per-step values, padded alike: cut with the sequence
    y[0], y[1, :3], y[2, :2] = np.arange(5), np.arange(3), np.arange(2)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    a = str(tmp_path / "a.npz")
    err = _fails(tmp_path, capsys, tmp_path / "a.npz", tmp_path / "a.npz")
    assert err == f"error: {a}: record 2: 1 " + INSIDE.format(unit="feature", c=1, t=2)
    assert (
        main(["--train", a, "--val", a, "--test", a, "--out", str(tmp_path / "o"), "--fill-missing", "previous"]) == 0
    )
    data = open_prepared(tmp_path / "o")
    test = data.split("test")
    assert test.lengths.tolist() == [5, 3, 2] and len(test.targets) == 10
    np.testing.assert_array_equal(test.sequence(2), [[4, 4], [4, 5]])
    real = np.concatenate([x[0], x[1, :3], x[2, :2]]).astype(np.float64)
    real[~np.isfinite(real)] = np.nan
    np.testing.assert_allclose(data.manifest["mean"], np.nanmean(real, axis=0), rtol=1e-6)


def test_japanese_vowels_with_missing_values_injected(vowels: Path, tmp_path: Path, capsys) -> None:
    """The real file with '@missing true': trailing '?' on one line change nothing; an inner one is refused."""
    text = (vowels / "JapaneseVowels_TRAIN.ts").read_text().replace("@missing false", "@missing true")
    lines = text.splitlines()
    first = next(n for n, line in enumerate(lines) if line.strip() == "@data") + 1  # index of the first sequence
    *channels, label = lines[first + 4].split(":")
    lines[first + 4] = ":".join([c + ",?,?" for c in channels] + [label])  # trailing: shortened back
    trailing = tmp_path / "trailing.ts"
    trailing.write_text("\n".join(lines) + "\n")
    test_ts = vowels / "JapaneseVowels_TEST.ts"
    out, ref = tmp_path / "t", tmp_path / "ref"
    assert main(["--train", str(trailing), "--val", str(trailing), "--test", str(test_ts), "--out", str(out)]) == 0
    train_ts = vowels / "JapaneseVowels_TRAIN.ts"
    assert main(["--train", str(train_ts), "--val", str(train_ts), "--test", str(test_ts), "--out", str(ref)]) == 0
    got, want = open_prepared(out), open_prepared(ref)
    np.testing.assert_array_equal(got.split("train").offsets, want.split("train").offsets)
    np.testing.assert_array_equal(got.split("train").features, want.split("train").features)
    assert got.manifest["mean"] == want.manifest["mean"] and got.manifest["std"] == want.manifest["std"]
    *channels, label = lines[first + 9].split(":")
    values = channels[3].split(",")
    values[2] = "?"
    lines[first + 9] = ":".join([*channels[:3], ",".join(values), *channels[4:], label])
    inner = tmp_path / "inner.ts"
    inner.write_text("\n".join(lines) + "\n")
    err = _fails(tmp_path, capsys, inner, test_ts)
    assert err == f"error: {inner}:{first + 10}: 1 " + INSIDE.format(unit="channel", c=4, t=3)


@pytest.mark.parametrize(
    ("key", "value"), [("mean", float("nan")), ("std", float("inf")), ("std", 0.0), ("mean", None), ("std", "x")]
)
def test_a_manifest_with_statistics_that_are_not_finite_is_refused_by_the_job(
    tmp_path: Path, key: str, value: object
) -> None:
    train = _ts(tmp_path / "train.ts", GOOD)
    assert main(["--train", str(train), "--test", str(train), "--out", str(tmp_path / "p")]) == 0
    manifest = tmp_path / "p" / "manifest.json"
    m = json.loads(manifest.read_text())
    m[key][1] = value
    manifest.write_text(json.dumps(m))  # NaN and Infinity as Python's json writes them
    with pytest.raises(UserError) as e:
        open_prepared(tmp_path / "p")
    assert e.value.exit_code == 2 and str(e.value) == (
        f"sequences.path={tmp_path / 'p'}: its manifest's mean/std per feature hold NaN, infinity or a zero std "
        "(normalisation divides by the std); prepare the folder again with this rnnddp-prepare"
    )
