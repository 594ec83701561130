"""bench/language_model.py: its three in-process loops train one network on one data layout, and it runs.

Tiny sizes (hidden 16, 4 stripes of 8 tokens): a few seconds on a CPU. Speed is not asserted.
"""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch

from bench.language_model import (
    CeilingLoop,
    RecipeLoop,
    RnnddpLoop,
    build_rnnddp,
    job_config,
    main,
    parse_args,
    prepare,
)
from rnnddp.dist import DistInfo
from rnnddp.tasks import TASKS

TINY = ["--hidden", "16", "--stripes", "4", "--bptt", "8", "--steps", "1", "--rounds", "1", "--device", "cpu"]


@pytest.fixture
def text(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "input.txt"
    path.write_text("".join(rng.choice("abcdefgh \n") for _ in range(4000)))
    return path


def test_recipe_rnnddp_and_ceiling_take_the_same_steps(tmp_path, text):
    # No dropout and a constant LR: the three loops then compute the same losses step after step
    # (same initial weights, same stripes, same AdamW and clipping), up to float rounding.
    same = ["lm.dropout_out=0", "sched.name=constant", "sched.warmup_steps=0"]
    s = parse_args(["--text", str(text), *TINY, "--set", *same])
    prepared = prepare(s, tmp_path)
    cfg = job_config(s, prepared, tmp_path / "cfg")
    task = TASKS[cfg.task](cfg, DistInfo())
    loops = [
        RecipeLoop(s, cfg, task),
        RnnddpLoop(build_rnnddp(s, prepared, tmp_path / "run")),
        CeilingLoop(s, cfg, task),
    ]
    for _ in range(3):
        assert [loop() for loop in loops] == [32, 32, 32]
        recipe, rnnddp, ceiling = (loop.loss for loop in loops)
        torch.testing.assert_close(rnnddp, recipe, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ceiling, recipe, rtol=1e-5, atol=1e-6)


def test_main_prints_and_writes_every_in_process_part(tmp_path, text, capsys, monkeypatch):
    # The environment record names torchvision's version; importing it takes seconds and no part uses it.
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(__version__="(not imported)"))
    out = tmp_path / "lm.json"
    assert main(["--text", str(text), *TINY, "--skip", "ddp2", "--out", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert all(parts[name]["tokens_per_s"] > 0 for name in ("recipe", "rnnddp", "ceiling"))
    assert parts["ddp2"] == {"skipped": "--skip"}
    assert "rnnddp / recipe" in capsys.readouterr().out
