"""The JapaneseVowels result in docs/results.md: prepare the UEA files, train 3 seeds on 2 ranks, median test accuracy.

    python -m bench.japanese_vowels --ts ../shared/data/UEA/JapaneseVowels [--nproc 2] [--seeds 0 1 2]

Runs configs/japanese_vowels.yaml as the job itself (torchrun, W&B off) on a folder prepared by
rnnddp-prepare (validation carved from train), and prints each seed's best validation and final
test accuracy, the median test accuracy and the wall time per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rnnddp.launch import REPO, job_command, job_env
from rnnddp.prepare import prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ts", type=Path, required=True, help="folder with JapaneseVowels_TRAIN.ts and _TEST.ts")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rnnddp-jv-") as tmp:
        data = prepare(a.ts / "JapaneseVowels_TRAIN.ts", a.ts / "JapaneseVowels_TEST.ts", Path(tmp) / "jv")
        tests = []
        print(f"| seed | best val accuracy | test accuracy | s ({a.nproc} ranks) |")
        print("| --- | --- | --- | --- |")
        for seed in a.seeds:
            run = Path(tmp) / f"run{seed}"
            args = ["--config", str(REPO / "configs/japanese_vowels.yaml"), f"sequences.path={data}", f"seed={seed}"]
            args += [f"run_dir={run}", "wandb.mode=disabled"]
            start = time.perf_counter()
            subprocess.run(job_command(args, nproc=a.nproc), env=job_env(threads=None), check=True, capture_output=True)
            took = time.perf_counter() - start
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            test = [r["test/accuracy"] for r in records if "test/accuracy" in r][-1]
            best = max(r["val/accuracy"] for r in records if "val/accuracy" in r)
            tests.append(test)
            print(f"| {seed} | {best:.4f} | {test:.4f} | {took:.0f} |")
        print(f"median test accuracy over seeds {a.seeds}: {statistics.median(tests):.4f}")


if __name__ == "__main__":
    main()
