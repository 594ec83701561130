"""How a 28x28 image becomes a sequence (``data.view``), applied per batch on the batch's device.

rows: [B, 28, 28] (the image itself); columns: [B, 28, 28] (transposed); pixels: [B, 784, 1]
in raster order; permuted_pixels: [B, 784, 1] in one fixed order drawn from a seed. Values are
torchvision's ToTensor() (x / 255), optionally standardised with the data set's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The registry of views (data.view): name -> features per step.
VIEWS = {"rows": 28, "columns": 28, "pixels": 1, "permuted_pixels": 1}
IMAGE_VIEWS = ("rows", "columns")  # views that keep the 2-D image (a CNN can read them)


def make_permutation(seed: int, length: int = 784) -> torch.Tensor:
    """The permuted_pixels order: a CPU generator seeded by ``seed`` gives every rank the same one."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def input_size(view: str) -> int:
    """Features per time step under ``view``: a row or column of 28 pixels, or one pixel."""
    return VIEWS[view]


@dataclass
class ImageView:
    """uint8 [B, 28, 28] -> float [B, T, F]: one object for the view, its pixel order and normalisation."""

    name: str = "rows"
    permutation: torch.Tensor | None = None  # permuted_pixels only
    mean: float | None = None  # set both to standardise after scaling to [0, 1]
    std: float | None = None

    def __post_init__(self) -> None:
        if self.name not in VIEWS:
            raise ValueError(f"unknown view {self.name!r}; one of {tuple(VIEWS)}")
        if (self.name == "permuted_pixels") != (self.permutation is not None):
            raise ValueError("view permuted_pixels needs a permutation, and only it takes one")

    @property
    def input_size(self) -> int:
        return VIEWS[self.name]

    def to(self, device: torch.device) -> ImageView:
        perm = self.permutation.to(device) if self.permutation is not None else None
        return ImageView(self.name, perm, self.mean, self.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return view_images(images, self.name, self.permutation, self.mean, self.std)

    def module(self) -> torch.nn.Module:
        """The view as a module (an exported graph's first step: uint8 images in)."""
        return ViewModule(self)


def view_images(
    images: torch.Tensor, name: str, permutation: torch.Tensor | None, mean: float | None, std: float | None
) -> torch.Tensor:
    x = images.float() / 255.0
    if mean is not None and std is not None:
        x = (x - mean) / std
    if name == "rows":
        return x
    if name == "columns":
        return x.transpose(1, 2).contiguous()  # contiguous: cuDNN's RNN wants dense input
    flat = x.reshape(x.shape[0], -1)
    if permutation is not None:
        flat = flat[:, permutation.to(flat.device)]
    return flat.unsqueeze(-1)


class ViewModule(torch.nn.Module):
    def __init__(self, view: ImageView) -> None:
        super().__init__()
        self.name, self.mean, self.std = view.name, view.mean, view.std
        self.register_buffer("permutation", view.permutation, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return view_images(images, self.name, self.permutation, self.mean, self.std)
