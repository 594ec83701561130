"""Your own sequences end to end: rnnddp-prepare on the real UEA JapaneseVowels files, then the job on 2
torchrun ranks (bucketed, packed), then rnnddp-evaluate with the class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnddp.data.readers import read_ts
from tests.conftest import final_eval, read_metrics, run_cli, run_job
from tests.sequence_files import write_csv
from tests.unit.test_prepare import vowels  # noqa: F401  (the fixture: the real files, or a skip)

pytestmark = pytest.mark.slow


def test_japanese_vowels_trains_on_two_ranks_and_evaluates_with_class_names(vowels: Path, tmp_path: Path) -> None:  # noqa: F811
    data, run = tmp_path / "jv", tmp_path / "run"
    prep = run_cli("rnnddp.prepare", "--train", vowels / "JapaneseVowels_TRAIN.ts",
                   "--test", vowels / "JapaneseVowels_TEST.ts", "--out", data)  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    assert "9 classes" in prep.stdout
    # The shipped config, shortened (60 epochs reach about 0.97; docs/results.md has 3 seeds in full).
    args = ["--config", "configs/japanese_vowels.yaml", f"sequences.path={data}", "train.epochs=30"]
    run_job([*args, f"run_dir={run}", "wandb.mode=offline", "train.log_every_steps=5", "eval.plots=true"], nproc=2)
    test = final_eval(run)["test/accuracy"]
    print(f"JapaneseVowels, 30 epochs, 2 ranks: test accuracy {test:.4f}")
    assert test >= 0.93
    pads = [m["train/pad_fraction"] for m in read_metrics(run) if "train/pad_fraction" in m]
    assert pads and max(pads) < 0.3, pads  # bucketed: similar lengths in a batch
    assert (run / "plots" / "test_sequences.png").is_file() and (run / "plots" / "confusion_matrix.png").is_file()
    ev = run_cli("rnnddp.evaluate", run, "--no-plots")
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {test:.4f}" in ev.stdout and "  9: " in ev.stdout and "(370 sequences)" in ev.stdout, ev.stdout
    # rnnddp-predict on raw test sequences from the .ts file, as .csv and .npy: mostly the true speaker.
    raw = read_ts(vowels / "JapaneseVowels_TEST.ts")
    files = [write_csv(tmp_path / f"seq{i}.csv", raw.features[i]) for i in range(0, 370, 37)]
    np.save(tmp_path / "seq5.npy", raw.features[5])
    pred = run_cli("rnnddp.predict", run, *files, tmp_path / "seq5.npy")
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
