"""Reproduce docs/results.md's language-model rows: prepare the corpus, train its config, report.

    python -m bench.language_results shakespeare --root ../shared/data/text --nproc 2
    python -m bench.language_results ptb --root ../shared/data/text --nproc 2 --epochs 1 \\
        model.hidden_size=200 lm.emb_size=200 model.dropout=0.2 lm.dropout_emb=0.2 lm.dropout_out=0.2 \\
        sched.name=constant

The corpus is prepared into a temporary folder (tiny-shakespeare at character level, the Penn
Treebank at word level with its own validation and test files), then ``configs/<config>.yaml``
runs as the job itself (torchrun with ``--nproc`` ranks), W&B off, with any overrides given.
Printed: every validation (step, training tokens seen so far, bits per character or perplexity),
the final model's test figure, the best validation figure (which picked ``best.pt``), tokens/s and
the wall time; the rows also go to ``bench_results/language.json``. ``--minutes M`` sizes the run
(``train.max_steps``) from a 30-step probe of the same command so that training takes about M minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rnnddp.data.text import prepare_text
from rnnddp.launch import job_command, job_env

REPO = Path(__file__).resolve().parent.parent
CORPORA = {
    "shakespeare": ("shakespeare_char", "char", "tinyshakespeare/input.txt", None),
    "ptb": ("ptb_word", "word", "ptb/ptb.train.txt", ("ptb/ptb.valid.txt", "ptb/ptb.test.txt")),
}


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(args: list[str], nproc: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(job_command(args, nproc), env=job_env(threads=1), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the job exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", choices=sorted(CORPORA))
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "text")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    p.add_argument("--minutes", type=float, help="size train.max_steps to about this many minutes of training")
    p.add_argument("overrides", nargs="*", help="key=value for the config")
    a = p.parse_intermixed_args(argv)
    config, tokenizer, train_file, given = CORPORA[a.corpus]
    with tempfile.TemporaryDirectory(prefix="rnnddp-lm-") as tmp:
        data = Path(tmp) / "data"
        val, test = (a.root / given[0], a.root / given[1]) if given else (None, None)
        prepare_text(a.root / train_file, data, tokenizer, val=val, test=test)
        base = ["--config", f"configs/{config}.yaml", f"lm.path={data}", "wandb.mode=disabled", "eval.plots=false"]
        base += [f"train.epochs={a.epochs}"] if a.epochs else []
        base += a.overrides
        if a.minutes:
            probe = Path(tmp) / "probe"
            train([*base, f"run_dir={probe}", "train.max_steps=40", "train.log_every_steps=10"], a.nproc)
            rates = [r["train/tokens_per_s"] for r in records(probe) if "train/tokens_per_s" in r][1:]
            rate = sum(rates) / len(rates)  # the first window holds the start-up
            steps = int(a.minutes * 60 * rate / step_tokens(base))
            base += [f"train.max_steps={steps}"]
            print(f"probe: {rate:.0f} tokens/s -> train.max_steps={steps} for about {a.minutes:g} minutes")
        run = Path(tmp) / "run"
        wall = train([*base, f"run_dir={run}"], a.nproc)
        recs = records(run)
        per_step = step_tokens(base)
        metric = next(k.split("/")[1] for r in recs for k in r if k.startswith("val/") and k != "val/loss")
        print(f"{config} on {a.nproc} rank(s), {' '.join(a.overrides) or 'the config as it is'}:")
        vals = [r for r in recs if f"val/{metric}" in r]
        for r in vals:
            print(
                f"  step {r['step']:6d}  {r['step'] * per_step / 1e6:7.2f} M tokens  val {metric} {r[f'val/{metric}']:.4f}"
            )
        test = next(r for r in recs if f"test/{metric}" in r)
        rates = [r["train/tokens_per_s"] for r in recs if "train/tokens_per_s" in r]
        row = {
            "config": config,
            "nproc": a.nproc,
            "overrides": a.overrides,
            "steps": test["step"],
            "tokens": test["step"] * per_step,
            f"test_{metric}": test[f"test/{metric}"],
            f"best_val_{metric}": min(r[f"val/{metric}"] for r in vals),
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
            "wall_s": round(wall, 1),
            "vals": [(r["step"], r[f"val/{metric}"]) for r in vals],
        }
        print(
            f"  final model: test {metric} {row[f'test_{metric}']:.4f} (best val {row[f'best_val_{metric}']:.4f}); "
            f"{row['tokens'] / 1e6:.2f} M training tokens, median {row['tokens_per_s']:.0f} tokens/s, {wall:.0f} s"
        )
    out = REPO / "bench_results"
    out.mkdir(exist_ok=True)
    (out / "language.json").open("a").write(json.dumps(row) + "\n")
    return 0


def step_tokens(args: list[str]) -> int:
    """Training tokens per optimiser step: stripes x bptt, from the resolved config."""
    from rnnddp.config import load_config

    cfg = load_config([a for a in args if not a.startswith("lm.path=")] + ["lm.path=unused"])
    return int(cfg.train.global_batch_size) * int(cfg.lm.bptt)


if __name__ == "__main__":
    sys.exit(main())
