"""Your own sequences end to end: rnnddp-prepare on the real UEA JapaneseVowels files, then the job on 2
torchrun ranks (bucketed, packed), then rnnddp-evaluate with the class names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnddp.data.readers import read_ts
from tests.conftest import REPO, final_eval, job_env, read_metrics, run_job
from tests.unit.test_prepare import vowels  # noqa: F401  (the fixture: the real files, or a skip)

pytestmark = pytest.mark.slow


def test_japanese_vowels_trains_on_two_ranks_and_evaluates_with_class_names(vowels: Path, tmp_path: Path) -> None:  # noqa: F811
    data, run = tmp_path / "jv", tmp_path / "run"
    prep = subprocess.run(
        [sys.executable, "-m", "rnnddp.prepare", "--train", str(vowels / "JapaneseVowels_TRAIN.ts"),
         "--test", str(vowels / "JapaneseVowels_TEST.ts"), "--out", str(data)],
        env=job_env(), cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "9 classes" in prep.stdout
    # The shipped config, shortened (60 epochs reach about 0.97; docs/results.md has 3 seeds in full).
    args = ["--config", "configs/japanese_vowels.yaml", f"sequences.path={data}", "train.epochs=30"]
    run_job([*args, f"run_dir={run}", "wandb.mode=offline", "train.log_every_steps=5"], nproc=2)
    test = final_eval(run)["test/accuracy"]
    print(f"JapaneseVowels, 30 epochs, 2 ranks: test accuracy {test:.4f}")
    assert test >= 0.93
    pads = [m["train/pad_fraction"] for m in read_metrics(run) if "train/pad_fraction" in m]
    assert pads and max(pads) < 0.3, pads  # bucketed: similar lengths in a batch
    assert (run / "plots" / "test_sequences.png").is_file() and (run / "plots" / "confusion_matrix.png").is_file()
    ev = subprocess.run(
        [sys.executable, "-m", "rnnddp.evaluate", str(run), "--no-plots"],
        env=job_env(), cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {test:.4f}" in ev.stdout and "  9: " in ev.stdout and "(370 sequences)" in ev.stdout, ev.stdout
    # rnnddp-predict on raw test sequences from the .ts file, as .csv and .npy: mostly the true speaker.
    raw = read_ts(vowels / "JapaneseVowels_TEST.ts")
    files = []
    for i in range(0, 370, 37):
        files.append(tmp_path / f"seq{i}.csv")
        files[-1].write_text("\n".join(",".join(f"{v:.9g}" for v in row) for row in raw.features[i]) + "\n")
    np.save(tmp_path / "seq5.npy", raw.features[5])
    pred = subprocess.run(
        [sys.executable, "-m", "rnnddp.predict", str(run), *map(str, files), str(tmp_path / "seq5.npy")],
        env=job_env(), cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    rows = [line.split("\t") for line in pred.stdout.strip().splitlines()]
    truth = [raw.labels[i] for i in range(0, 370, 37)] + [raw.labels[5]]
    assert [r[0] for r in rows] == [*map(str, files), str(tmp_path / "seq5.npy")]
    assert sum(r[1] == t for r, t in zip(rows, truth, strict=True)) >= 9 and all(0 < float(r[2]) <= 1 for r in rows)


def test_a_folder_that_is_not_prepared_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_job(
        ["task=sequence_classification", f"sequences.path={tmp_path}", f"run_dir={tmp_path}/run"], check=False
    )
    assert proc.returncode == 2 and "is not a prepared data set" in proc.stderr and "rnnddp-prepare" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
