"""task=language_model as a job: 1 rank = 2 ranks = 2 launchers x 2 ranks, exact resumes with the carried state
(SIGKILL, and a stop resumed on another number of ranks), a dependency longer than bptt, real learning on
tiny-shakespeare, generation, and bad input."""

from __future__ import annotations

import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from rnnddp import prepare
from rnnddp.checkpoint import load
from rnnddp.data.text import open_text
from rnnddp.dist import DistInfo
from rnnddp.models import build_model
from rnnddp.train.carry import CarriedState
from rnnddp.wandb_files import history, offline_runs
from tests.conftest import (
    DATA_ROOT,
    REPO,
    effective_train_steps,
    final_eval,
    free_port,
    job_env,
    latest_state,
    read_metrics,
    run_job,
)
from tests.hosts import torchrun_cmd, wait_all

SHAKESPEARE = DATA_ROOT / "text" / "tinyshakespeare" / "input.txt"
STEPS = 70  # two epochs' worth: 56 steps per epoch (see the fixture), so every run crosses an epoch's end


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8,000 characters of tiny-shakespeare, prepared at character level (the last 10%: val, test)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny-shakespeare not found at {SHAKESPEARE}")
    base = tmp_path_factory.mktemp("lm")
    text = base / "small.txt"
    text.write_text(SHAKESPEARE.read_text()[:8000])
    assert prepare.main(["--text", str(text), "--tokenizer", "char", "--out", str(base / "chars")]) == 0
    return base / "chars"


def args(folder: Path, run: Path, *extra: str) -> list[str]:
    return [
        "task=language_model",
        f"lm.path={folder}",
        f"run_dir={run}",
        "lm.bptt=16",
        "lm.variable_bptt=true",  # lengths and offsets drawn from seed and step: must come back on resume
        "lm.random_offset=true",
        "lm.emb_size=16",
        "lm.eval_stripes=4",
        "model.hidden_size=24",
        "model.num_layers=2",
        "train.global_batch_size=8",  # 8 stripes: 8, 4 or 2 per rank
        f"train.max_steps={STEPS}",
        "train.log_every_steps=1",
        "checkpoint.every_steps=10",
        # SGD, as the classic LM recipes: Adam divides by sqrt(v), so a rounding difference of 1e-9 in a
        # near-zero gradient (another summation order on 2 ranks) becomes an lr-sized step difference.
        "optim.name=sgd",
        "optim.lr=2.0",
        "sched.name=cosine",
        "wandb.mode=disabled",
        *extra,
    ]


def _params(run: Path) -> dict[str, torch.Tensor]:
    state = latest_state(run)
    assert state["global_step"] == STEPS
    return state["model"]


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_ranks(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run: the reference of the resumes and the model the CLI tests use."""
    run = tmp_path_factory.mktemp("two") / "run"
    run_job(args(folder, run), nproc=2)
    return run


def test_one_rank_two_ranks_and_two_launchers_train_the_same_model(folder: Path, two_ranks: Path, tmp_path: Path):
    run_job(args(folder, tmp_path / "one"), nproc=1)
    one, two = _params(tmp_path / "one"), _params(two_ranks)
    assert _worst(one, two) < 1e-5, "2 ranks differ from 1 process"
    # Two torchrun launchers of 2 ranks each (two "nodes" on loopback): 4 ranks of 2 stripes each.
    cmd = torchrun_cmd(f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8], args(folder, tmp_path / "four"))
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    for log in logs:
        with log.open("w") as out:
            nodes.append(subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    wait_all(nodes, timeout=300)
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log.read_text()[-3000:]
    assert latest_state(tmp_path / "four")["world_size"] == 4
    assert _worst(one, _params(tmp_path / "four")) < 1e-5, "2 launchers x 2 ranks differ from 1 process"
    init = build_model(latest_state(tmp_path / "one")["model_args"]).state_dict()
    assert _worst({k: one[k] for k in init}, init) > 1e-3  # trained: not two initialisations compared


def test_a_sigkill_resumes_bit_for_bit_and_a_stop_resumes_on_another_number_of_ranks(
    folder: Path, two_ranks: Path, tmp_path: Path
):
    # Rank 1 SIGKILLed after step 63 (epoch 1, mid-stream, its own offset and lengths); torchrun restarts
    # both ranks, which resume from step 60 with every stripe's state from the checkpoint. W&B on (offline).
    kill = tmp_path / "kill"
    run_job(
        args(folder, kill, "debug.fail_at_step=63", "debug.fail_rank=1", "wandb.mode=offline"),
        nproc=2,
        launcher=["--max-restarts=1"],
    )
    resumes = [m for m in read_metrics(kill) if m.get("event") == "resume"]
    assert [m["step"] for m in resumes] == [60], resumes
    ref = _params(two_ranks)
    assert all(torch.equal(ref[k], v) for k, v in _params(kill).items()), "the resumed run differs from the reference"
    assert effective_train_steps(kill) == list(range(1, STEPS + 1))
    runs = offline_runs(kill)
    assert sorted(int(r["_step"]) for f in runs for r in history(f) if "train/loss" in r) == list(range(1, STEPS + 1))

    # A stop after step 25 on 2 ranks, resumed on 1 process: the 8 stripes' states are re-sliced (to 1e-5: one
    # process sums the batch in another order).
    stop = tmp_path / "stop"
    proc = run_job(args(folder, stop, "debug.stop_at_step=25"), nproc=2, check=False)
    stopped = [m["step"] for m in read_metrics(stop) if m.get("event") == "stopped"]
    assert proc.returncode != 0 and len(stopped) == 1 and 25 <= stopped[0] < STEPS, (stopped, proc.stderr[-2000:])
    assert latest_state(stop)["global_step"] == stopped[0]  # where the ranks' stop vote agreed
    carry = latest_state(stop)["carry"]
    assert len(carry) == 2 and carry[0][0].shape == (1, 8, 24)  # every layer's (h, c), all 8 stripes
    assert carry[0][0].dtype == torch.float32 and carry[0][0].abs().sum() > 0
    run_job(args(folder, stop), nproc=1)
    assert _worst(ref, _params(stop)) < 1e-5, "2 -> 1 rank resume differs"


def _dependency_text(path: Path, chars: int, seed: int) -> None:
    """Blocks ``k . . . ? k``: a key x or y, 1-16 dots, a query, the key again. The answer after ``?`` is
    the key, up to 18 tokens back; nothing nearer tells it."""
    rng = random.Random(seed)
    blocks, n = [], 0
    while n < chars:
        key = rng.choice("xy")
        blocks.append(key + "." * rng.randint(1, 16) + "?" + key)
        n += len(blocks[-1])
    path.write_text("".join(blocks))


def test_a_dependency_longer_than_bptt_is_learnt_through_the_carried_state(tmp_path: Path):
    for name, size, seed in (("train", 40_000, 0), ("val", 4000, 1), ("test", 4000, 2)):
        _dependency_text(tmp_path / f"{name}.txt", size, seed)
    data = tmp_path / "data"
    t = [str(tmp_path / f"{n}.txt") for n in ("train", "val", "test")]
    assert prepare.main(["--text", t[0], "--val", t[1], "--test", t[2], "--tokenizer", "char", "--out", str(data)]) == 0
    bptt = 8
    run = tmp_path / "run"
    run_job(
        [
            "task=language_model",
            f"lm.path={data}",
            f"run_dir={run}",
            f"lm.bptt={bptt}",
            "lm.emb_size=16",
            "model.hidden_size=32",
            "train.global_batch_size=16",
            "train.max_steps=1200",
            "optim.lr=0.01",
            "sched.name=constant",
            "train.log_every_steps=200",
            "wandb.mode=disabled",
        ]
    )
    state = load(run / "checkpoints" / "best.pt")
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    model.eval()
    tok = open_text(data).tokenizer
    text = (tmp_path / "test.txt").read_text()
    ids = torch.tensor(tok.encode(text))[None]

    def answers(carry: bool) -> tuple[float, float]:
        """Accuracy on answers whose key is more than bptt tokens back, and on the others."""
        carried = CarriedState(DistInfo(), 1)
        preds = []
        with torch.no_grad():
            for p in range(0, ids.shape[1] - 1, bptt):
                logp, state = model(ids[:, p : p + bptt], carried.state)
                if carry:
                    carried.keep(state)
                preds.append(logp.argmax(-1)[0])
        pred = torch.cat(preds)
        far, near = [], []
        for i, c in enumerate(text[:-1]):
            if c == "?":
                key_at = max(text.rfind("x", 0, i), text.rfind("y", 0, i))
                (far if i + 1 - key_at > bptt else near).append(tok.decode([int(pred[i])]) == text[i + 1])
        assert len(far) > 100 and len(near) > 100
        return sum(far) / len(far), sum(near) / len(near)

    far, near = answers(carry=True)
    assert far > 0.95 and near > 0.95, (far, near)
    far_reset, _ = answers(carry=False)  # the same model, its state dropped at each chunk: the key is lost
    assert far_reset < 0.8, far_reset
    test_bpc = final_eval(run, "bpc")["test/bpc"]  # the job's own evaluation carries the state too
    assert test_bpc < 0.48, test_bpc


@pytest.mark.slow
def test_tiny_shakespeare_is_learnt_far_below_the_unigram_and_bigram_rates(tmp_path: Path):
    """2 ranks, 400 steps of 32 stripes x 64 characters (0.8 M characters, under one epoch): a 1-layer
    LSTM-256 gets far below the unigram (4.8 bits per character) and bigram (3.6) rates."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny-shakespeare not found at {SHAKESPEARE}")
    data = tmp_path / "chars"
    assert prepare.main(["--text", str(SHAKESPEARE), "--tokenizer", "char", "--out", str(data)]) == 0
    run = tmp_path / "run"
    run_job(
        [
            "task=language_model",
            f"lm.path={data}",
            f"run_dir={run}",
            "lm.bptt=64",
            "lm.emb_size=32",
            "lm.tie_weights=false",
            "lm.eval_stripes=32",
            "model.hidden_size=256",
            "train.global_batch_size=32",
            "train.max_steps=400",
            "optim.lr=0.006",
            "sched.name=cosine",
            "sched.warmup_steps=20",
            "train.log_every_steps=100",
            "wandb.mode=disabled",
        ],
        nproc=2,
    )
    bpc = final_eval(run, "bpc")["test/bpc"]
    print(f"tiny-shakespeare, 400 steps on 2 ranks: test {bpc:.3f} bits per character")
    assert bpc < 2.8, bpc


def test_generation_is_deterministic_needs_no_data_folder_and_refuses_bad_input(
    folder: Path, two_ranks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from rnnddp import evaluate, generate

    def cli(main, *argv: object) -> tuple[int, str, str]:  # in process: one torch import for all the calls
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    # The checkpoint carries the tokenizer: generate from a run whose data folder is not there.
    hidden = folder.parent / "hidden"
    folder.rename(hidden)
    try:
        first, again, other = (
            cli(generate.main, run, "--prompt", "First", "--tokens", 40, "--seed", s) for s in (3, 3, 4)
        )
        greedy = [
            cli(generate.main, run, "--prompt", "First", "--tokens", 40, "--temperature", 0, "--seed", s)
            for s in (1, 2)
        ]
        bad = cli(generate.main, run, "--prompt", "Fïrst €", "--tokens", 5)
    finally:
        hidden.rename(folder)
    assert first[0] == 0, first[2]
    assert first[1] == again[1] and first[1] != other[1]
    assert first[1].startswith("First") and len(first[1].rstrip("\n")) == len("First") + 40
    assert greedy[0][1] == greedy[1][1]  # temperature 0: the most likely token, whatever the seed
    assert bad[0] == 2 and bad[2].strip().splitlines() == [
        "error: the prompt has character(s) the model's vocabulary lacks: 'ï', '€'; remove or replace them "
        f"(the model knows {open_text(folder).tokenizer.vocab_size} characters, those of its training text)"
    ]

    # evaluate: the test split (the job's own figure), and any text file in the model's tokens.
    test_bpc = final_eval(run, "bpc")["test/bpc"]
    code, out, err = cli(evaluate.main, run, "--no-plots")
    assert code == 0, err
    assert f"bits per character {test_bpc:.4f}" in out, out
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"Ye gods, " + "caf\xe9".encode("latin-1"))
    code, out, err = cli(evaluate.main, run, "--no-plots", "--text", latin)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {latin}: not UTF-8 at byte offset 12 (0xe9); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    ]


def test_a_text_folder_and_a_sequence_folder_are_not_mixed_up(folder: Path, tmp_path: Path):
    proc = run_job(["task=sequence_classification", f"sequences.path={folder}", f"run_dir={tmp_path}/a"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: sequences.path={folder} holds prepared text, not sequences; train it with task=language_model "
        f"lm.path={folder}"
    ]
    short = run_job(args(folder, tmp_path / "b", "train.global_batch_size=512"), check=False)
    assert short.returncode == 2 and len(short.stderr.strip().splitlines()) == 1, short.stderr
    assert "fewer than train.global_batch_size x (lm.bptt + 1)" in short.stderr
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())
    few = run_job(args(folder, tmp_path / "c", "lm.eval_stripes=300"), check=False)
    assert few.returncode == 2 and few.stderr.strip().splitlines() == [
        f"error: {folder}'s val split holds 432 tokens, too few for lm.eval_stripes=300 stripes of two tokens; "
        "set lm.eval_stripes= lower or give more text"
    ]
