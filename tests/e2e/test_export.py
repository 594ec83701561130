"""rnnddp-export against real runtimes: onnxruntime and torch.export's saved program, on real inputs.

Each model is a checkpoint with its weights drawn away from the initial ones (what the outputs are
does not matter, only that the exported file gives the network's), written as the job writes one.
The inputs are real: MNIST test digits, JapaneseVowels test sequences (at their own unequal lengths,
in batches of several sizes, none the export's example), per-step sequences, sine waves continued
chunk by chunk, and a test text stepped through with the state fed back.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from rnnddp import checkpoint
from rnnddp.checkpoint import CheckpointManager
from rnnddp.config import load_config, to_dict
from rnnddp.data.sequences import pad_batch
from rnnddp.data.streams import eval_chunks
from rnnddp.dist import DistInfo
from rnnddp.evaluate import restore, run_evaluation
from rnnddp.export.cli import main as export_main
from rnnddp.export.write import export_model
from rnnddp.generate import generate
from rnnddp.models import initial_model
from rnnddp.predict import predict
from rnnddp.prepare import main as prepare_main
from rnnddp.prepare import prepare
from rnnddp.tasks import TASKS
from tests.conftest import DATA_ROOT, REPO, run_cli
from tests.sequence_files import write_step_files

SHAKESPEARE = DATA_ROOT / "text" / "tinyshakespeare" / "input.txt"
VOWELS = DATA_ROOT / "UEA" / "JapaneseVowels"


def make_run(run: Path, overrides: list[str], seed: int = 1) -> Path:
    """A run directory holding one checkpoint of the config ``overrides`` name, weights moved off their init."""
    cfg = load_config(["wandb.mode=disabled", *overrides])
    task = TASKS[cfg.task](cfg, DistInfo(device=torch.device("cpu")))
    args = task.model_args()
    model = initial_model(args, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Each weight scaled by its own draw, biases shifted: outputs unlike the init's, at the init's scale
            # (a recurrent layer whose weights grow past it turns chaotic and magnifies float rounding).
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=gen)).add_(0.05 * torch.randn(p.shape, generator=gen))
    state = {
        "format": checkpoint.FORMAT,
        "model": model.state_dict(),
        "model_args": args,
        "config": to_dict(cfg),
        "global_step": 0,
        **task.state_dict(),
    }
    CheckpointManager(run).save(state, 0)
    return run


def onnx_session(folder: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def pt2_program(folder: Path):
    """The saved program, called as a server calls it: without gradients."""
    program = torch.export.load(str(folder / "model.pt2")).module()

    def call(*xs: torch.Tensor):
        with torch.no_grad():
            return program(*xs)

    return call


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# -- MNIST: uint8 digits in, the view and scaling inside the graph -----------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "formats"),
    [
        ("rows_lstm", ["model.cell=lstm", "model.hidden_size=16"], ("onnx", "pt2")),
        ("permuted_gru", ["data.view=permuted_pixels", "model.cell=gru", "model.hidden_size=8"], ("onnx", "pt2")),
        (
            "columns_birnn_2x",
            [
                "data.view=columns",
                "model.cell=rnn",
                "model.bidirectional=true",
                "model.num_layers=2",
                "data.normalize=true",
            ],
            ("onnx", "pt2"),
        ),  # fmt: skip
        ("cnn", ["model.name=cnn"], ("onnx",)),
    ],
)
def test_mnist_classifiers_give_the_networks_logits(name, overrides, formats, mnist_root: Path, tmp_path: Path):
    run = make_run(tmp_path / "run", [f"data.root={mnist_root}", *overrides])
    r = restore(run, [])
    images = r.task.load().test.inputs[:64]  # uint8 [64, 28, 28], real test digits
    with torch.no_grad():
        want = r.module(r.task.view(images)).numpy()
    for fmt in formats:
        out = tmp_path / fmt
        info = export_model(run, fmt, out)
        assert info["inputs"][0] == {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", 28, 28],
            "meaning": info["inputs"][0]["meaning"],
            "high": 256,
        }
        assert info["classes"] == [str(k) for k in range(10)]
        if fmt == "onnx":
            session = onnx_session(out)
            meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
            assert json.loads(meta["rnnddp.serving"])["task"] == "classify"
            got = [session.run(None, {"images": images[a:b].numpy()})[0] for a, b in ((0, 1), (1, 8), (8, 64))]
        else:
            program = pt2_program(out)
            got = [program(images[a:b]).detach().numpy() for a, b in ((0, 1), (1, 8), (8, 64))]
        assert worst(np.concatenate(got), want) < 1e-5, (name, fmt)
        assert json.loads((out / "serving.json").read_text())["task"] == "classify"


# -- Sequences of unequal lengths: JapaneseVowels ---------------------------------------------------------


@pytest.fixture(scope="module")
def vowels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (VOWELS / "JapaneseVowels_TRAIN.ts").is_file():
        pytest.skip(f"JapaneseVowels not found at {VOWELS}")
    out = tmp_path_factory.mktemp("vowels") / "prepared"
    return prepare(VOWELS / "JapaneseVowels_TRAIN.ts", VOWELS / "JapaneseVowels_TEST.ts", out)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_sequence_classifier_takes_any_batch_of_unequal_lengths(fmt: str, vowels: Path, tmp_path: Path):
    run = make_run(
        tmp_path / "run",
        [
            "task=sequence_classification",
            f"sequences.path={vowels}",
            "model.bidirectional=true",
            "model.num_layers=2",
            "model.hidden_size=16",
        ],  # fmt: skip
    )
    r = restore(run, [])
    test = r.task.load().test
    assert len(set(test.lengths[:40].tolist())) > 5  # lengths 7 to 29: unequal
    info = export_model(run, fmt, tmp_path / "out")
    assert info["classes"] == r.task.data.class_names and len(info["preparation_in_graph"]["standardise"]["mean"]) == 12
    if fmt == "onnx":
        session = onnx_session(tmp_path / "out")

        def served(x, n):
            return session.run(None, {"x": x.numpy(), "lengths": n.numpy()})[0]
    else:
        program = pt2_program(tmp_path / "out")

        def served(x, n):
            return program(x, n).detach().numpy()

    raw = [torch.from_numpy(test.sequence(i).astype(np.float32)) for i in range(40)]  # as the files hold them
    for size in (1, 5, 34):  # batches of these sizes, each padded to its longest
        for start in range(0, 40 - size + 1, size):
            index = np.arange(start, start + size)
            x, lengths, _, _ = pad_batch(test, index, r.task.mean, r.task.std)
            with torch.no_grad():
                want = r.module(x, lengths).numpy()
            padded = torch.nn.utils.rnn.pad_sequence([raw[i] for i in index], batch_first=True)
            got = served(padded, lengths)
            assert worst(got, want) < 1e-5, (fmt, size, start)
            if size > 1:  # a batch of unequal lengths answers as each sequence alone
                alone = np.concatenate([served(raw[i][None], torch.tensor([len(raw[i])])) for i in index])
                assert worst(got, alone) < 1e-5


@pytest.mark.parametrize(("kind", "task", "cell", "bidirectional"), [
    ("classes", "step_classification", "gru", False),
    ("values", "step_regression", "lstm", True),
])  # fmt: skip
def test_per_step_models_answer_every_real_step(kind, task, cell, bidirectional, tmp_path: Path):
    folder = prepare(*write_step_files(tmp_path / "raw", kind, train=60, test=30), tmp_path / "prepared")
    run = make_run(
        tmp_path / "run",
        [
            f"task={task}",
            f"sequences.path={folder}",
            f"model.cell={cell}",
            f"model.bidirectional={bidirectional}",
            "model.hidden_size=12",
        ],  # fmt: skip
    )
    r = restore(run, [])
    test = r.task.load().test
    index = np.arange(len(test))
    x, lengths, _, _ = pad_batch(test, index, r.task.mean, r.task.std)
    raw, _, _, _ = pad_batch(test, index, None, None)
    real = (torch.arange(x.shape[1])[None] < lengths[:, None]).numpy()
    with torch.no_grad():
        want = r.module(x, lengths).numpy()
    for fmt in ("onnx", "pt2"):
        export_model(run, fmt, tmp_path / fmt)
        if fmt == "onnx":
            got = onnx_session(tmp_path / fmt).run(None, {"x": raw.numpy(), "lengths": lengths.numpy()})[0]
        else:
            got = pt2_program(tmp_path / fmt)(raw, lengths).detach().numpy()
        assert worst(got[real], want[real]) < 1e-5, fmt
        assert not got[~real].any()  # past each sequence's end: zeros


# -- State carried by the caller: the sine regressor and the language model -----------------------------


def test_sine_regressor_continues_chunk_by_chunk(tmp_path: Path):
    run = make_run(tmp_path / "run", ["task=sine_regression", "model.cell=lstm", "model.num_layers=2"])
    r = restore(run, [])
    t = torch.linspace(0, 20, 200)
    x = torch.stack([torch.sin(t), torch.sin(0.5 * t + 1)]).unsqueeze(-1)  # [2, 200, 1]
    with torch.no_grad():
        want = r.module(x)[0].numpy()  # the whole sequence in one call
    for fmt, dtype, tol in (("onnx", "fp32", 1e-5), ("pt2", "fp32", 1e-5), ("pt2", "fp16", 2e-2)):
        info = export_model(run, fmt, tmp_path / f"{fmt}_{dtype}", dtype=dtype)
        assert info["state"] == [{"input": "h", "output": "h_out"}, {"input": "c", "output": "c_out"}]
        if fmt == "onnx":
            session = onnx_session(tmp_path / f"{fmt}_{dtype}")

            def step(chunk, h, c):
                return session.run(None, {"x": chunk, "h": h, "c": c})  # noqa: B023
        else:
            program = pt2_program(tmp_path / f"{fmt}_{dtype}")

            def step(chunk, h, c):
                return [o.detach().numpy() for o in program(*(torch.from_numpy(a) for a in (chunk, h, c)))]  # noqa: B023

        h = c = np.zeros((2, 2, r.module.rnn.hidden_size), dtype=np.float32)
        outs = []
        for a, b in ((0, 1), (1, 50), (50, 123), (123, 200)):  # chunks of 1, 49, 73, 77 steps
            y, h, c = step(x[:, a:b].numpy(), h, c)
            outs.append(y)
        assert worst(np.concatenate(outs, axis=1), want) < tol, (fmt, dtype)
    # The program needs torch only: loaded and run where importing rnnddp fails.
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys; sys.modules['rnnddp'] = None\n"
        "import numpy as np, torch\n"
        "program = torch.export.load(sys.argv[1]).module()\n"
        "x = torch.from_numpy(np.load(sys.argv[2])); h = torch.zeros(2, 2, int(sys.argv[3]))\n"
        "with torch.no_grad():\n"
        "    np.save(sys.argv[4], program(x, h, h.clone())[0].numpy())\n"
    )
    args = [tmp_path / "pt2_fp32" / "model.pt2", tmp_path / "x.npy", r.module.rnn.hidden_size, tmp_path / "y.npy"]
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert worst(np.load(tmp_path / "y.npy"), want) < 1e-5


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny-shakespeare not found at {SHAKESPEARE}")
    base = tmp_path_factory.mktemp("text")
    (base / "small.txt").write_text(SHAKESPEARE.read_text()[:12000])
    assert prepare_main(["--text", str(base / "small.txt"), "--tokenizer", "char", "--out", str(base / "chars")]) == 0
    return base / "chars"


@pytest.mark.parametrize(("fmt", "model"), [
    ("onnx", ["model.cell=lstm", "model.num_layers=2"]),
    ("pt2", ["model.cell=gru", "lm.tie_weights=false", "lm.adaptive_cutoffs=[10,30]"]),
])  # fmt: skip
def test_language_model_stepped_with_its_state_gives_the_jobs_test_figure(fmt, model, text_folder, tmp_path):
    run = make_run(
        tmp_path / "run",
        [
            "task=language_model",
            f"lm.path={text_folder}",
            "model.hidden_size=24",
            "lm.emb_size=16",
            "lm.bptt=20",
            "lm.eval_stripes=4",
            *model,
        ],  # fmt: skip
    )
    job = run_evaluation(run, [])  # the job's own test figure: bits per character, the state carried
    info = export_model(run, fmt, tmp_path / "out")
    assert info["tokenizer"]["kind"] == "char" and len(info["tokenizer"]["vocab"]) == info["model"]["vocab_size"]
    names = [s["input"] for s in info["state"]]
    if fmt == "onnx":
        session = onnx_session(tmp_path / "out")

        def step(tokens, state):
            return session.run(None, {"tokens": tokens, **dict(zip(names, state, strict=True))})
    else:
        program = pt2_program(tmp_path / "out")

        def step(tokens, state):
            return [o.detach().numpy() for o in program(torch.from_numpy(tokens), *map(torch.from_numpy, state))]

    shapes = {s["name"]: s["shape"] for s in info["inputs"]}
    state = [np.zeros([4 if d == "batch" else d for d in shapes[n]], dtype=np.float32) for n in names]
    nll, count = 0.0, 0
    for x, y in eval_chunks(job["test"].tokens, 4, 20):  # the test split, 4 stripes, 20 tokens a chunk
        logp, *state = step(x.numpy().astype(np.int64), state)
        nll -= float(np.take_along_axis(logp, y.numpy()[..., None].astype(np.int64), axis=-1).astype(np.float64).sum())
        count += y.numel()
    bpc = nll / count / math.log(2)
    assert count == job["tokens"]
    assert abs(bpc - job["bpc"]) < 1e-4, (bpc, job["bpc"])


# -- Bad input: one line, exit 2, nothing written ----------------------------------------------------------


def test_bad_input_is_one_line_exit_2_and_writes_nothing(mnist_root: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path / "run", [f"data.root={mnist_root}", "model.hidden_size=4"])
    ckpt = run / "checkpoints" / "step_0000000.pt"
    (tmp_path / "taken").mkdir()
    (tmp_path / "a_file").write_text("")
    state = torch.load(ckpt, weights_only=True)
    odd = {
        "unknown_task": {**state, "config": {**state["config"], "task": "translate"}},
        "future": {**state, "format": 99},
    }
    for name, s in odd.items():
        CheckpointManager(tmp_path / name).save(s, 0)
    (tmp_path / "empty_run").mkdir()
    cases = {
        "no checkpoint": [str(tmp_path / "empty_run"), "--format", "onnx", "--out", str(tmp_path / "o1")],
        "unknown task": [str(tmp_path / "unknown_task"), "--format", "onnx", "--out", str(tmp_path / "o2")],
        "newer format": [str(tmp_path / "future"), "--format", "pt2", "--out", str(tmp_path / "o3")],
        "folder exists": [str(run), "--format", "onnx", "--out", str(tmp_path / "taken")],
        "cannot write": [str(run), "--format", "onnx", "--out", str(tmp_path / "a_file" / "out")],
        "fp16 onnx": [str(run), "--format", "onnx", "--dtype", "fp16", "--out", str(tmp_path / "o4")],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for what, argv in cases.items():
        assert export_main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (what, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary folder left
    assert not list((tmp_path / "taken").iterdir())
    # The installed entry point, as a user runs it: a sequence model's exported answer is printed on success.
    proc = run_cli("rnnddp.export.cli", run, "--format", "onnx", "--out", tmp_path / "served")
    assert proc.returncode == 0, proc.stderr
    assert "max difference" in proc.stdout and (tmp_path / "served" / "model.onnx").is_file()


# -- docs/serving.md's server: onnxruntime and NumPy only ----------------------------------------------


def run_example(*args: object) -> str:
    """examples/serve_onnx.py in a fresh interpreter where importing torch or rnnddp fails."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.modules['rnnddp'] = None; "
        f"sys.argv = ['serve_onnx.py', *{[str(a) for a in args]!r}]; "
        f"runpy.run_path({str(REPO / 'examples' / 'serve_onnx.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_serving_example_answers_as_predict_and_generate(mnist_root, vowels, text_folder, tmp_path: Path):
    from PIL import Image, ImageOps

    digits = make_run(tmp_path / "digits", [f"data.root={mnist_root}", "model.hidden_size=16"])
    r = restore(digits, [])
    # A real test digit as a user has it: dark ink on white paper, larger than 28x28.
    digit = Image.fromarray(r.task.load().test.inputs[7].numpy())
    ImageOps.invert(digit).resize((84, 84)).save(tmp_path / "digit.png")
    export_model(digits, "onnx", tmp_path / "digits_onnx")
    assert run_example(tmp_path / "digits_onnx", tmp_path / "digit.png").splitlines() == predict(
        digits, [str(tmp_path / "digit.png")]
    )

    seqs = make_run(tmp_path / "seqs", ["task=sequence_classification", f"sequences.path={vowels}"])
    raw = restore(seqs, []).task.load().test.sequence(3).astype(np.float32)
    np.save(tmp_path / "vowel.npy", raw)
    export_model(seqs, "onnx", tmp_path / "seqs_onnx")
    assert run_example(tmp_path / "seqs_onnx", tmp_path / "vowel.npy").splitlines() == predict(
        seqs, [str(tmp_path / "vowel.npy")]
    )

    lm = make_run(tmp_path / "lm", ["task=language_model", f"lm.path={text_folder}", "model.hidden_size=24"])
    export_model(lm, "onnx", tmp_path / "lm_onnx")
    ids, _ = generate(restore(lm, []), "ROMEO:", 40, temperature=0)
    text = run_example(tmp_path / "lm_onnx", "--prompt", "ROMEO:", "--tokens", 40, "--temperature", 0)
    assert text.rstrip("\n") == "ROMEO:" + restore(lm, []).task.tokenizer.decode(ids)
