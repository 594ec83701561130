"""Image files for ``rnnddp-predict`` on a digit classifier: any picture -> a 28x28 MNIST-like digit."""

from __future__ import annotations

from pathlib import Path

import torch

from rnnddp.errors import UserError


def load_image(path: str | Path) -> torch.Tensor:
    """uint8 [28, 28], bright digit on a dark background (raises UserError naming the file).

    Converted to grayscale and resized to 28x28; a mostly light image (a dark digit on white paper)
    is inverted so the digit is bright on black, as in MNIST.
    """
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
