"""Weight averaging: validation, best.pt and the final test on an average of the training weights.

``average.mode`` picks how (training always goes on with its own weights; a checkpoint holds both):

- ``ema``: an exponential moving average, updated after every optimiser step after ``average.start_step``:
  avg = decay * avg + (1 - decay) * weights, the first such step's weights starting it.
- ``asgd``: AWD-LSTM's non-monotonically triggered averaging (NT-ASGD). Averaging starts at the first
  validation whose result is worse than the best of the validations before the last ``nonmono`` ones;
  from then on the average is the equal-weight mean of the weights validated at the switch and after
  every step since. AWD-LSTM also switches its optimiser to ASGD there (with ``lambd=0``: SGD that
  averages its iterates); here the run's optimiser is kept and only the averaging is taken.

Built on ``torch.optim.swa_utils.AveragedModel`` of the unwrapped module. Under DDP every rank updates its
own copy from the same weights, so all hold the same average and rank 0 writes it, like the model. The
averaged copy is a plain module of the model's class, called the same way (a carried state included).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rnnddp.errors import UserError
from rnnddp.metrics import Metric
from rnnddp.models import place

log = logging.getLogger("rnnddp")

AVERAGE_MODES = ("none", "ema", "asgd")


class WeightAverage:
    """An average of ``module``'s weights (parameters and buffers), taken per ``mode`` (ema | asgd).

    The trainer calls ``update(step)`` after every optimiser step and ``on_validation(value, step)``
    with every validation result (the same on every rank); ``module_for_eval()`` is what validation,
    best.pt's choice and the final test evaluate.
    """

    def __init__(
        self,
        module: nn.Module,
        mode: str,
        metric: Metric,
        *,
        ema_decay: float = 0.999,
        nonmono: int = 5,
        start_step: int = 0,
    ) -> None:
        if mode not in ("ema", "asgd"):
            raise ValueError(f"no weight averaging mode {mode!r}; choose ema or asgd")
        self.source = module  # the training weights (unwrapped: DDP's wrapper is not averaged)
        self.mode, self.metric = mode, metric
        self.nonmono, self.start_step = nonmono, start_step
        # asgd: None selects AveragedModel's equal-weight running mean.
        multi_avg_fn = get_ema_multi_avg_fn(ema_decay) if mode == "ema" else None
        # n_averaged stays on the CPU: module_for_eval reads it without a device sync (update_parameters still
        # copies it to the device, one host sync per averaged step on CUDA).
        self.averaged = AveragedModel(module, multi_avg_fn=multi_avg_fn, use_buffers=True)
        device = next(module.parameters()).device
        place(self.averaged.module, device).eval()  # one flat cuDNN weight buffer, as the model has
        self.started_at: int | None = None  # the first step whose weights are in the average
        self.history: list[float] = []  # asgd: validation results before the switch

    @classmethod
    def from_config(cls, average: Any, module: nn.Module, metric: Metric) -> WeightAverage | None:
        """The averaging ``average`` (the config's section) asks for; None for ``mode=none``."""
        if average.mode == "none":
            return None
        a = average
        return cls(module, a.mode, metric, ema_decay=a.ema_decay, nonmono=a.nonmono, start_step=a.start_step)

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, step: int) -> None:
        """After optimiser step ``step``: take the training weights into the average once it has started."""
        if self.mode == "ema" and self.started_at is None and step > self.start_step:
            self.started_at = step
            log.info("averaging weights from step %d (ema)", step)
        if self.started_at is not None:
            self.averaged.update_parameters(self.source)

    def on_validation(self, value: float, step: int) -> bool:
        """asgd: start averaging at step ``step`` when ``value`` stalled (AWD-LSTM's rule, for lower-is-better
        ``val > min(history[:-nonmono])``); returns whether it started here."""
        if self.mode != "asgd" or self.started_at is not None:
            return False
        best = None
        for earlier in self.history[: -self.nonmono]:  # empty until there are more than nonmono
            if self.metric.better(earlier, best):
                best = earlier
        self.history.append(value)
        if best is None or not self.metric.better(best, value):  # not strictly worse (NaN never is)
            return False
        self.started_at = step
        self.averaged.update_parameters(self.source)  # the weights just validated are the mean's first
        log.info(
            "averaging weights from step %d (validation stalled); %s %.4f is worse than %.4f, the best before "
            "the last %d validations",
            step,
            self.metric.name,
            value,
            best,
            self.nonmono,
        )
        return True

    def module_for_eval(self) -> nn.Module:
        """The averaged module once it holds an average, else the training module."""
        return self.averaged.module if self.n_averaged > 0 else self.source

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries: ``averaged_model`` (the model's key layout; None before averaging starts) and
        ``averaging`` (what a resume needs to go on exactly)."""
        n = self.n_averaged
        return {
            "averaged_model": self.averaged.module.state_dict() if n > 0 else None,
            "averaging": {
                "mode": self.mode,
                "n_averaged": n,
                "started_at": self.started_at,
                "history": list(self.history),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("averaging")
        if saved is None:  # a checkpoint written without averaging: it starts afresh
            saved = {"mode": self.mode, "n_averaged": 0, "started_at": None, "history": []}
        if saved["mode"] != self.mode:
            raise UserError(
                f"the checkpoint averaged weights by {saved['mode']}, the config says average.mode={self.mode}; "
                f"set average.mode={saved['mode']} to resume that run"
            )
        if state.get("averaged_model") is not None:
            self.averaged.module.load_state_dict(state["averaged_model"])
        self.averaged.n_averaged.fill_(saved["n_averaged"])
        self.started_at = saved["started_at"]
        self.history = list(saved["history"])
