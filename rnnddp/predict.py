"""Classify image files with a trained checkpoint.

    python -m rnnddp.predict CHECKPOINT image.png [more.jpg ...] [key=value ...]

CHECKPOINT is a ``.pt`` file or a run directory. Each image is converted to grayscale and
resized to 28x28; a mostly light image (a dark digit on white paper) is inverted so the digit is
bright on black, as in MNIST. Prints one line per file: the file, the predicted label and its
probability. A file that is not a readable image is a one-line error naming it (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rnnddp import dist
from rnnddp.errors import UserError


def load_image(path: str | Path) -> torch.Tensor:
    """uint8 [28, 28], bright digit on a dark background (raises UserError naming the file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = img.convert("L")  # also decodes: a truncated file fails here, not later
            if gray.size != (28, 28):
                gray = gray.resize((28, 28), Image.Resampling.BILINEAR)
            x = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(28, 28).clone()
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image (PNG, JPEG or another format Pillow reads)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0][:120]}") from None
    # MNIST digits are light on black: a mostly light picture is the other polarity.
    if x.float().mean() > 127.5:
        x = 255 - x
    return x


def predict(target: str | Path, images: list[str], overrides: list[str] | None = None) -> list[tuple[str, int, float]]:
    """(file, label, probability) per image, with the checkpoint's view, normalisation and permutation."""
    from rnnddp.evaluate import restore

    if not images:
        raise UserError("no image files given: python -m rnnddp.predict CHECKPOINT image.png [...]")
    pixels = torch.stack([load_image(p) for p in images])  # every file is checked before any work
    r = restore(target, overrides or [])
    view = r.task.predict_view()
    if view is None:
        raise UserError(f"{r.path} is a task={r.cfg.task} model; predict classifies digit images only")
    with torch.no_grad():
        probs = torch.softmax(r.module(view(pixels)).float(), dim=1)
    conf, labels = probs.max(dim=1)
    return [(str(p), int(y), float(c)) for p, y, c in zip(images, labels, conf, strict=True)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    overrides = [a for a in rest if "=" in a and not Path(a).exists()]
    images = [a for a in rest if a not in overrides]
    try:
        results = predict(target, images, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for path, label, prob in results:
        print(f"{path}\t{label}\t{prob:.4f}")
    return 0


if __name__ == "__main__":
    dist.fast_exit(main())
