"""How an exported graph runs a recurrent stack, with the time length left free.

Two ways, one contract: ``run(rnn, x, lengths, state) -> (outputs [B, T, directions * H], state)``
for a batch-first ``nn.LSTM``/``nn.GRU``/``nn.RNN`` in eval mode. With ``lengths`` each sequence ends at
its own length: the backward direction starts at that step and the returned state is the one at that
step. Outputs past a sequence's end are undefined; callers read only real steps.

- ``run_modules`` calls the modules themselves (packed when the backward direction needs the lengths).
  The ONNX exporter turns them into ONNX's LSTM/GRU/RNN operators, whose time length is free.
- ``run_scan`` writes the cells out and loops with ``torch.scan``'s higher-order op. ``torch.export``
  fixes the time length of an ``nn.LSTM`` call to the example's (the program then refuses any other);
  a scan keeps it symbolic, so the saved program takes any length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._higher_order_ops.scan import scan


def run_modules(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, Any]:
    if lengths is not None and rnn.bidirectional:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = rnn(packed, state)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], state
    return rnn(x, state)


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """[B, T, F] with each sequence's first ``length`` steps reversed (padding stays at the end)."""
    if lengths is None:
        return torch.flip(x, [1])
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    n = lengths.to(x.device).unsqueeze(1)
    index = torch.where(t < n, n - 1 - t, t)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def _cell(rnn: nn.RNNBase) -> Any:
    """The cell's step, (input projection [B, G], carried state, weights) -> new carried state."""
    if isinstance(rnn, nn.LSTM):

        def lstm(xt: torch.Tensor, carry: tuple, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple:
            h, c = carry
            i, f, g, o = (xt + h @ w_hh.T + b_hh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c

        return lstm
    if isinstance(rnn, nn.GRU):

        def gru(xt: torch.Tensor, carry: tuple, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple:
            (h,) = carry
            xr, xz, xn = xt.chunk(3, dim=-1)
            hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return ((1 - z) * n + z * h,)

        return gru
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu

    def plain(xt: torch.Tensor, carry: tuple, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple:
        return (act(xt + carry[0] @ w_hh.T + b_hh),)

    return plain


def run_scan(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, Any]:
    lstm = isinstance(rnn, nn.LSTM)
    dirs = 2 if rnn.bidirectional else 1
    batch, steps, hidden = x.shape[0], x.shape[1], rnn.hidden_size
    if state is None:
        zeros = x.new_zeros(rnn.num_layers * dirs, batch, hidden)
        state = (zeros, zeros) if lstm else zeros
    parts = state if lstm else (state,)
    real = torch.ones(steps, batch, 1, dtype=x.dtype, device=x.device)
    if lengths is not None:  # 1 where a step is real: past a sequence's end the state stays as it was
        real = (torch.arange(steps, device=x.device).unsqueeze(1) < lengths.to(x.device).unsqueeze(0)).to(x.dtype)
        real = real.unsqueeze(-1)
    step = _cell(rnn)
    finals: list[list[torch.Tensor]] = [[] for _ in parts]
    layer_in = x
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
            b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)
            seq = _reverse_within(layer_in, lengths) if d else layer_in
            projected = (seq @ w_ih.T + b_ih).transpose(0, 1)  # [T, B, gates * H], one matmul for all steps
            carry0 = tuple(p[layer * dirs + d] for p in parts)

            def combine(carry: tuple, xs: tuple, w_hh: torch.Tensor = w_hh, b_hh: torch.Tensor = b_hh) -> tuple:
                xt, keep = xs
                new = step(xt, carry, w_hh, b_hh)
                new = tuple(keep * n + (1 - keep) * o for n, o in zip(new, carry, strict=True))
                return new, new[0].clone()

            last, ys = scan(combine, carry0, (projected, real))
            ys = ys.transpose(0, 1)
            outs.append(_reverse_within(ys, lengths) if d else ys)
            for k, t in enumerate(last):
                finals[k].append(t)
        layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
    stacked = tuple(torch.stack(f) for f in finals)
    return layer_in, stacked if lstm else stacked[0]
