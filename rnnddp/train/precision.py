"""The one precision rule: fp32, bf16 or fp16, its autocast context, and whether gradients are loss-scaled.

The trainer, evaluate and the benchmarks all take it from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("rnnddp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision
ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device: torch.device

    @property
    def scaled(self) -> bool:
        """Loss scaling for fp16, and for bf16 on CUDA: under bf16 autocast aten's AutocastRNN still runs
        cuDNN's LSTM/GRU/RNN in fp16 (measured on an H100 and an H200), so their gradients need it too."""
        return self.name == "fp16" or (self.name == "bf16" and self.device.type == "cuda")

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """Autocast for bf16/fp16; ``cache=False`` where CUDA graphs are captured (they refuse its cast cache)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.scaled)


def resolve_precision(precision: str, device: torch.device, warn: bool = True) -> Precision:
    """fp32 | bf16 | fp16 for this device; ``auto`` follows ``accelerate launch --mixed_precision``."""
    if precision == "auto":
        precision = ACCELERATE_PRECISION.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "fp32")
    if precision == "fp16" and device.type != "cuda":
        if warn:
            log.warning("train.precision=fp16 needs a CUDA GPU; running in fp32 on %s", device.type)
        precision = "fp32"
    return Precision(precision, device)
