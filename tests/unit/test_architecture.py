"""The layout's promises: no import cycles, a trainer that names no task, a task added in one file."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rnnddp.tasks import TASKS
from tests.conftest import REPO, job_env

PACKAGE = REPO / "rnnddp"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """rnnddp module -> the rnnddp modules it imports (``from a.b import c`` counts a.b.c when c is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("rnnddp")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rnnddp"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert "rnnddp.train.trainer" in graph and "rnnddp.tasks.classify" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_trainer_and_job_name_no_task():
    words = {"sine", "regress", *TASKS}
    pattern = re.compile("|".join(rf"(?<![a-z]){w}" for w in sorted(words)), re.IGNORECASE)  # not "cosine"
    files = [*sorted((PACKAGE / "train").glob("*.py")), PACKAGE / "job.py"]
    hits = [
        f"{p.name}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == [], "\n".join(hits)


# A third task, written as the README says: one file, one registry line, its config section.
PARITY = '''
"""parity: is the number of ones in a random bit sequence odd? (A task added in one file.)"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rnnddp.data.batches import Split, TrainBatches, eval_batches
from rnnddp.metrics import Metric
from rnnddp.models import classifier_args
from rnnddp.tasks.base import Splits, Task


@dataclass
class ParityConfig:
    sequences: int = 512
    length: int = 6


def _split(n, length, seed):
    bits = torch.randint(0, 2, (n, length, 1), generator=torch.Generator().manual_seed(seed)).float()
    return Split(bits, bits.sum(dim=(1, 2)).long() % 2)


class Parity(Task):
    name = "parity"
    section = "parity"
    Section = ParityConfig
    metric = Metric("accuracy", higher_is_better=True)

    def model_args(self):
        return classifier_args(self.cfg.model, input_size=1, num_classes=2)

    def load(self):
        p = self.cfg.parity
        return Splits(_split(p.sequences, p.length, self.cfg.seed), _split(128, p.length, 1), _split(128, p.length, 2))

    def train_batches(self, split):
        c, i = self.cfg, self.info
        return TrainBatches(split, global_batch_size=c.train.global_batch_size, rank=i.rank,
                            world_size=i.world_size, seed=c.seed, device=i.device)

    def loss(self, model, batch, autocast):
        x, y = batch
        with autocast:
            return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, module, split, autocast, detail=False):
        x, y = next(eval_batches(split, len(split), self.info.device))
        with autocast:
            logits = module(x).float()
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item(),
                "samples": len(split)}
'''


def test_a_new_task_is_one_file_and_one_registry_line(tmp_path: Path):
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "rnnddp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", copy / "configs")
    shutil.copy(REPO / "train_ddp.py", copy / "train_ddp.py")
    (copy / "rnnddp" / "tasks" / "parity.py").write_text(PARITY)
    registry = copy / "rnnddp" / "tasks" / "__init__.py"
    text = registry.read_text().replace(
        "from rnnddp.tasks.sine_regression import SineRegression\n",
        "from rnnddp.tasks.sine_regression import SineRegression\nfrom rnnddp.tasks.parity import Parity\n",
    )
    registry.write_text(
        text.replace(
            '    "sine_regression": SineRegression,\n',
            '    "sine_regression": SineRegression,\n    "parity": Parity,\n',
        )
    )
    env = {**job_env(), "PYTHONPATH": str(copy)}
    run = tmp_path / "run"
    args = ["task=parity", "parity.length=4", "model.hidden_size=16", "train.global_batch_size=32", "train.epochs=6"]
    args += ["optim.lr=0.02", "wandb.mode=disabled", f"run_dir={run}"]
    proc = subprocess.run(
        [sys.executable, str(copy / "train_ddp.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "done: best val accuracy" in proc.stdout and "test accuracy" in proc.stdout
    assert (run / "checkpoints" / "best.pt").is_file()
    bad = subprocess.run(
        [sys.executable, str(copy / "train_ddp.py"), "task=parity", "parity.lenght=4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown config key 'parity.lenght'" in bad.stderr


def test_every_mutant_still_applies_once() -> None:
    """python -m tests.mutants edits one place per mutant; code that moved must move the mutant too."""
    from tests.mutants import MUTANTS, REPO

    moved = [m.name for m in MUTANTS if (REPO / m.file).read_text().count(m.old) != 1]
    assert not moved, f"mutants whose text is not found exactly once: {moved}"


def test_gloo_errors_of_a_lost_peer_are_recognised() -> None:
    """The messages gloo gave in the host tests (a killed host, a cut link) mean a lost peer; others do not.

    Not the type: a DistError from a bug (NCCL's invalid argument, a port in use, an empty store
    queue) is a crash (exit 1 with its traceback), not a lost peer to requeue."""
    import torch.distributed as tdist

    from rnnddp.dist import lost_peer

    seen = [
        "[../gloo/transport/tcp/pair.cc:545] Read error [10.231.56.2]:33420: Connection reset by peer.",
        "Connection closed by peer [127.0.0.1]:16814",
        "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete",
        "Application timeout caused pair closure",
    ]
    assert all(lost_peer(RuntimeError(m)) for m in seen)
    assert all(lost_peer(tdist.DistBackendError(m)) for m in seen)
    # NCCL's words for a peer gone (ncclRemoteError) and for its watchdog's timeout.
    nccl_lost = [
        "NCCL error in: ProcessGroupNCCL.cpp:2076, remote process exited or there was a network error, "
        "NCCL version 2.27.5",
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) "
        "ran for 60000 milliseconds before timing out.",
    ]
    assert all(lost_peer(tdist.DistBackendError(m)) for m in nccl_lost)
    # DistErrors raised by bugs (messages as torch 2.14 and NCCL give them).
    bugs = [
        tdist.DistBackendError("anything"),
        tdist.DistBackendError(
            "NCCL error in: ProcessGroupNCCL.cpp:3426, invalid argument (run with NCCL_DEBUG=WARN for details), "
            "NCCL version 2.27.5\nncclInvalidArgument: Invalid value for an argument."
        ),
        tdist.DistBackendError(
            "NCCL error in: ProcessGroupNCCL.cpp:1871, invalid usage (run with NCCL_DEBUG=WARN for details)"
        ),
        tdist.DistNetworkError(
            "The server socket has failed to listen on any local network address. port: 29500, useIpv6: false, "
            "code: -98, name: EADDRINUSE, message: address already in use"
        ),
        tdist.QueueEmptyError("queue is empty"),
        tdist.DistStoreError("wait timeout after 5000ms, keys: /default_pg/0//never"),
    ]
    assert not [e for e in bugs if lost_peer(e)]
    # gloo's own complaints about a misused collective: plain RuntimeErrors.
    assert not lost_peer(
        RuntimeError("ProcessGroupGloo::allgather: invalid tensor size at index 1 (expected (2), got (1))")
    )
    assert not lost_peer(
        RuntimeError("Detected mismatch between collectives on ranks. Rank 0 is running collective: ...")
    )
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer"))
