"""Serve a model rnnddp-export wrote, with onnxruntime and NumPy only (no rnnddp, no torch).

    python examples/serve_onnx.py EXPORT_DIR digit.png                 # a digit classifier
    python examples/serve_onnx.py EXPORT_DIR sequence.npy              # a sequence classifier ([T, F])
    python examples/serve_onnx.py EXPORT_DIR --prompt "ROMEO:" --tokens 200 [--temperature 0.8]

Everything the model needs comes from EXPORT_DIR/serving.json: the inputs' names and shapes, the
class names, the vocabulary and the state to feed back. Pillow reads the PNG; a BPE model's
tokenizer.json is read with the ``tokenizers`` package. Not part of the rnnddp package: copy it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def classify_png(session: onnxruntime.InferenceSession, info: dict, path: Path) -> str:
    from PIL import Image

    gray = Image.open(path).convert("L")
    if gray.size != (28, 28):
        gray = gray.resize((28, 28), Image.Resampling.BILINEAR)
    x = np.asarray(gray, dtype=np.uint8)
    if x.mean() > 127.5:  # a dark digit on light paper: MNIST's digits are light on black
        x = 255 - x
    p = softmax(session.run(None, {"images": x[None]})[0][0])
    return f"{path}\t{info['classes'][int(p.argmax())]}\t{p.max():.4f}"


def classify_sequence(session: onnxruntime.InferenceSession, info: dict, path: Path) -> str:
    x = np.load(path).astype(np.float32)  # [T, F], raw: the graph standardises it
    p = softmax(session.run(None, {"x": x[None], "lengths": np.array([len(x)], dtype=np.int64)})[0][0])
    return f"{path}\t{info['classes'][int(p.argmax())]}\t{p.max():.4f}"


class Tokens:
    """The model's tokenizer from serving.json: characters, words (unknown ones become <unk>), or BPE."""

    def __init__(self, folder: Path, spec: dict) -> None:
        self.kind = spec["kind"]
        if self.kind == "bpe":
            from tokenizers import Tokenizer

            self.bpe = Tokenizer.from_file(str(folder / spec["file"]))
        else:
            self.vocab = spec["vocab"]
            self.index = {t: i for i, t in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self.bpe.encode(text).ids
        if self.kind == "char":
            return [self.index[c] for c in text]  # a character the model never saw raises KeyError
        return [self.index.get(w, self.index.get("<unk>", 0)) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bpe":
            return self.bpe.decode(ids)
        return ("" if self.kind == "char" else " ").join(self.vocab[i] for i in ids)


def continue_text(
    session: onnxruntime.InferenceSession, info: dict, folder: Path, prompt: str, n: int, temperature: float, seed: int
) -> str:
    tokens = Tokens(folder, info["tokenizer"])
    shapes = {t["name"]: t["shape"] for t in info["inputs"]}
    state = {
        s["input"]: np.zeros([1 if d == "batch" else d for d in shapes[s["input"]]], np.float32) for s in info["state"]
    }
    names = [t["name"] for t in info["outputs"]]
    rng = np.random.default_rng(seed)
    ids, out = tokens.encode(prompt), []
    for _ in range(n):
        results = dict(zip(names, session.run(None, {"tokens": np.array([ids], dtype=np.int64), **state}), strict=True))
        state = {s["input"]: results[s["output"]] for s in info["state"]}  # carried: only the new token goes in next
        logp = results["log_probs"][0, -1]
        nxt = int(logp.argmax()) if temperature == 0 else int(rng.choice(len(logp), p=softmax(logp / temperature)))
        out.append(nxt)
        ids = [nxt]
    return prompt + ("" if tokens.kind != "word" else " ") + tokens.decode(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("inputs", nargs="*", type=Path, help=".png digits or .npy sequences")
    p.add_argument("--prompt")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    info = json.loads((a.folder / "serving.json").read_text())
    session = onnxruntime.InferenceSession(str(a.folder / info["file"]), providers=["CPUExecutionProvider"])
    if a.prompt is not None:
        print(continue_text(session, info, a.folder, a.prompt, a.tokens, a.temperature, a.seed))
    for path in a.inputs:
        print(classify_png(session, info, path) if path.suffix == ".png" else classify_sequence(session, info, path))


if __name__ == "__main__":
    main()
