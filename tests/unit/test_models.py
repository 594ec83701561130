import math

import pytest
import torch

from rnnddp.models import CELLS, SequenceClassifier, SequenceTagger, build_model, chrono_init_
from rnnddp.train.optim import lr_factor


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (2, True)])
def test_shapes_and_backward(cell, layers, bidirectional):
    args = dict(
        cell=cell,
        input_size=28,
        hidden_size=12,
        num_layers=layers,
        dropout=0.1,
        bidirectional=bidirectional,
        num_classes=10,
    )
    model = build_model(args)
    x = torch.rand(5, 28, 28)
    logits = model(x)
    assert logits.shape == (5, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.args == args


def test_unidirectional_head_reads_the_last_step():
    model = build_model(
        dict(cell="lstm", input_size=28, hidden_size=6, num_layers=2, dropout=0.0, bidirectional=False, num_classes=10)
    )
    x = torch.rand(3, 28, 28)
    out, _ = model.rnn(x)
    assert torch.allclose(model(x), model.head(out[:, -1]))


def test_bidirectional_head_sees_both_final_states():
    model = build_model(
        dict(cell="gru", input_size=28, hidden_size=6, num_layers=1, dropout=0.0, bidirectional=True, num_classes=10)
    )
    x = torch.rand(3, 28, 28)
    out, _ = model.rnn(x)
    both = torch.cat([out[:, -1, :6], out[:, 0, 6:]], dim=1)  # forward at step T, backward at step 1
    assert torch.allclose(model(x), model.head(both), atol=1e-6)


class _S:
    def __init__(self, **kw):
        self.__dict__.update(dict(name="constant", warmup_steps=0, min_lr_ratio=0.0, pct_start=0.2) | kw)


def test_schedules():
    assert lr_factor(50, 100, _S()) == 1.0
    assert lr_factor(0, 100, _S(warmup_steps=10)) == pytest.approx(0.1)
    cos = _S(name="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(1.0)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    one = _S(name="onecycle", pct_start=0.25)
    factors = [lr_factor(s, 100, one) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 25) and max(factors) == pytest.approx(1.0, abs=1e-3)
    assert factors.index(max(factors)) == 25 and factors[-1] < 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_chrono_init_keeps_a_memory_across_the_blank_end_of_a_digit(cell):
    # The pixel view ends a digit with ~100 blank pixels (median; up to ~300). Under PyTorch's
    # init the first input's influence on the last state fades to ~1e-30 over 150 of them
    # (nothing to learn from); chrono keeps it ~1e-4.
    def influence(chrono: bool) -> float:
        torch.manual_seed(0)
        rnn = CELLS[cell](1, 32, batch_first=True)
        if chrono:
            chrono_init_(rnn, 784)
        x = torch.zeros(8, 150, 1, requires_grad=True)
        rnn(x)[0][:, -1].sum().backward()
        return x.grad[:, 0].abs().mean().item()

    assert influence(chrono=False) < 1e-20
    assert influence(chrono=True) > 1e-6


def test_chrono_init_biases():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 16, num_layers=2, bidirectional=True)
    chrono_init_(lstm, 100)
    for name, b in lstm.named_parameters():
        if name.startswith("bias_hh"):
            assert b.abs().max() == 0
        elif name.startswith("bias_ih"):
            i, f, g, o = b.split(16)
            assert f.min() >= 0 and f.max() <= math.log(99) and f.std() > 0.5
            assert torch.equal(i, -f) and g.abs().max() == 0 and o.abs().max() == 0
    gru = torch.nn.GRU(3, 16)
    chrono_init_(gru, 100)
    r, z, n = gru.bias_ih_l0.split(16)  # h' = (1 - z) * n + z * h: z is the gate that keeps
    assert z.min() >= 0 and z.max() <= math.log(99) and z.std() > 0.5
    assert r.abs().max() == 0 and n.abs().max() == 0 and gru.bias_hh_l0.abs().max() == 0
    with pytest.raises(ValueError, match="LSTM or GRU"):
        chrono_init_(torch.nn.RNN(3, 16), 100)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_a_padded_batch_gives_each_sequence_what_it_gives_alone(cell: str, bidirectional: bool) -> None:
    """Two layers deep; bidirectional (packed: the backward direction starts at each sequence's last
    real step) or one-way (padded, read at that step)."""
    torch.manual_seed(0)
    model = SequenceClassifier(
        cell=cell, input_size=3, hidden_size=8, num_layers=2, bidirectional=bidirectional, num_classes=4
    )
    model.eval()
    lengths = torch.tensor([5, 9, 2, 7])
    seqs = [torch.randn(int(n), 3) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=7.0)  # loud padding
    together = model(padded, lengths)
    alone = torch.cat([model(s[None]) for s in seqs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(padded)[0], alone[0], atol=1e-3)  # unpacked, the padding would leak in


@pytest.mark.parametrize("bidirectional", [True, False])
def test_a_padded_batch_tags_each_step_as_each_sequence_alone(bidirectional: bool) -> None:
    """The per-step network, two layers: every real step's output is the sequence's own, padding aside."""
    torch.manual_seed(0)
    model = SequenceTagger(cell="lstm", input_size=3, hidden_size=8, num_layers=2, bidirectional=bidirectional,
                           output_size=4)  # fmt: skip
    model.eval()
    lengths = torch.tensor([5, 9, 2, 7])
    seqs = [torch.randn(int(n), 3) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=7.0)
    together = model(padded, lengths)
    assert together.shape == (4, 9, 4)
    for row, s in enumerate(seqs):
        torch.testing.assert_close(together[row, : len(s)], model(s[None])[0], rtol=1e-5, atol=1e-6)
    if bidirectional:  # unpacked, the backward direction would start in the padding
        assert not torch.allclose(model(padded)[0, :5], together[0, :5], atol=1e-3)
