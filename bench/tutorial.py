"""The tutorial program this project grew from, as a whole process: the baseline of the whole-process comparison.

    python -m bench.tutorial --root ../shared/data --epochs 2

torchvision MNIST + ToTensor + DataLoader(shuffle), LSTM(28 -> 64) + Linear on the last step,
Adam 0.01, cross-entropy, batch 64; then the test accuracy. Written here, as the tutorials write it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


class TutorialLSTM(nn.Module):
    """The tutorials' model: LSTM over the 28 rows, Linear on the last step's output."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a folder whose MNIST/raw holds the uncompressed IDX files")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    from torch.utils.data import DataLoader
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    train = DataLoader(MNIST(a.root, train=True, transform=ToTensor()), batch_size=a.batch, shuffle=True)
    test = DataLoader(MNIST(a.root, train=False, transform=ToTensor()), batch_size=1000)
    torch.manual_seed(0)
    model = TutorialLSTM(a.hidden)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(a.epochs):
        for images, labels in train:
            loss = criterion(model(images.reshape(-1, 28, 28)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    correct = 0
    with torch.no_grad():
        for images, labels in test:
            correct += (model(images.reshape(-1, 28, 28)).argmax(1) == labels).sum().item()
    print(f"test accuracy {correct / len(test.dataset):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
