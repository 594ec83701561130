"""The one precision rule: fp32, bf16 or fp16, its autocast context, and whether gradients are loss-scaled.

The trainer, evaluate and the benchmarks all take it from here.
"""

from __future__ import annotations

import contextlib
import functools
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
    rnn_fp32: bool = False  # bf16 on a CPU whose oneDNN cannot build a bf16 LSTM: the recurrent layers run in fp32

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
        cast = torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache)
        return _WithoutOneDNN(cast) if self.rnn_fp32 else cast

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
    rnn_fp32 = precision == "bf16" and device.type == "cpu" and not cpu_bf16_rnn_supported()
    if rnn_fp32 and warn:
        log.warning(
            "train.precision=bf16: this CPU (%s) has no bf16 LSTM in oneDNN; the recurrent layers run in fp32, "
            "the rest in bf16",
            torch.backends.cpu.get_cpu_capability(),
        )
    return Precision(precision, device, rnn_fp32)


@functools.cache
def cpu_bf16_rnn_supported() -> bool:
    """Whether oneDNN runs an LSTM under CPU bf16 autocast here: it needs AVX-512 and fails to build its
    primitive on older CPUs (AVX2), a RuntimeError at the first forward."""
    lstm = torch.nn.LSTM(2, 2)
    try:
        with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


class _WithoutOneDNN:
    """Autocast with oneDNN off, so torch takes its own LSTM kernels (fp32) where oneDNN's would fail. Entered
    again and again like the autocast it wraps (the job enters one object every step); oneDNN is restored on
    exit, so fp32 runs in the same process keep it."""

    def __init__(self, cast: torch.autocast) -> None:
        self.cast, self.was = cast, True

    def __enter__(self) -> None:
        self.was = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        self.cast.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            self.cast.__exit__(*exc)
        finally:
            torch.backends.mkldnn.enabled = self.was
