"""The language model's stream layout (rnnddp/data/streams.py) and network (rnnddp/models.py LanguageModel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnddp.data.streams import StreamBatches, eval_chunks
from rnnddp.errors import UserError
from rnnddp.models import LanguageModel

TOKENS = np.arange(10_000, dtype=np.uint16) % 997  # token i is i % 997: positions are readable


def batches(world: int = 1, rank: int = 0, **kw) -> StreamBatches:
    args = dict(global_batch_size=8, bptt=7, rank=rank, world_size=world, seed=3)
    return StreamBatches(TOKENS, **{**args, **kw})


def test_each_stripe_continues_where_it_stopped_and_targets_are_the_next_tokens():
    b = batches()
    assert b.length == 10_000 // 8 and b.steps_per_epoch == (b.length - 1) // 7
    steps = list(b.epoch(0))
    assert len(steps) == b.steps_per_epoch and [s.new_epoch for s in steps[:2]] == [True, False]
    inputs = torch.cat([s.inputs for s in steps], dim=1)
    targets = torch.cat([s.targets for s in steps], dim=1)
    for g in range(8):  # stripe g is the stream from g * L on, read in order, each token once
        start = g * b.length
        expect = torch.from_numpy(TOKENS[start : start + inputs.shape[1] + 1].astype(np.int64))
        assert torch.equal(inputs[g], expect[:-1]) and torch.equal(targets[g], expect[1:])


@pytest.mark.parametrize("kw", [{}, {"variable_bptt": True, "random_offset": True}])
def test_ranks_own_blocks_of_stripes_and_together_make_the_one_rank_batch(kw):
    one = list(batches(**kw).epoch(1))
    for world in (2, 4):
        parts = [list(batches(world, r, **kw).epoch(1)) for r in range(world)]
        for step, whole in enumerate(one):
            assert torch.equal(torch.cat([p[step].inputs for p in parts]), whole.inputs)
            assert torch.equal(torch.cat([p[step].targets for p in parts]), whole.targets)
            assert {p[step].lr_scale for p in parts} == {whole.lr_scale}
    # A resume mid-epoch continues at the same position.
    again = list(batches(**kw).epoch(1, start_step=5))
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(again, one[5:], strict=True))


def test_variable_bptt_and_random_offset_come_from_seed_and_epoch():
    b = batches(bptt=20, variable_bptt=True, random_offset=True)
    offset, lengths = b.plan(0)
    assert 0 <= offset < 20 and lengths.sum() <= b.length - 1 and lengths.min() >= 1
    assert len(set(lengths.tolist())) > 3  # drawn, not fixed
    assert b.plan(0)[0] == offset and np.array_equal(b.plan(0)[1], lengths)
    assert not np.array_equal(b.plan(1)[1], lengths)
    other_seed = batches(bptt=20, variable_bptt=True, random_offset=True, seed=4)
    assert not np.array_equal(other_seed.plan(0)[1], lengths)
    first = next(b.epoch(0))
    assert first.inputs.shape[1] == lengths[0] and first.lr_scale == lengths[0] / 20
    assert first.inputs[0, 0].item() == TOKENS[offset]
    offsets = {b.plan(e)[0] for e in range(8)}
    assert len(offsets) > 1  # the stripes' cut points move from epoch to epoch


def test_a_stream_too_short_for_the_batch_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"fewer than train.global_batch_size x \(lm.bptt \+ 1\) = 808"):
        StreamBatches(TOKENS[:800], global_batch_size=8, bptt=100, rank=0, world_size=1, seed=0)
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        batches(world=3)


def test_evaluation_chunks_predict_every_token_of_each_stripe_but_its_first():
    chunks = list(eval_chunks(TOKENS[:1003], stripes=4, bptt=64))
    x = torch.cat([c[0] for c in chunks], dim=1)
    y = torch.cat([c[1] for c in chunks], dim=1)
    assert x.shape == (4, 250 - 1)
    assert torch.equal(y[1], torch.from_numpy(TOKENS[251:500].astype(np.int64)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_language_model_carries_its_state_and_ties_its_weights(cell):
    torch.manual_seed(0)
    model = LanguageModel(cell, vocab_size=50, emb_size=16, hidden_size=24, num_layers=2).eval()
    assert model.decoder.weight is model.embedding.weight
    x = torch.randint(50, (3, 20))
    whole, _ = model(x)
    a, state = model(x[:, :8])
    b, _ = model(x[:, 8:], state)
    assert torch.allclose(torch.cat([a, b], dim=1), whole, atol=1e-6)  # carrying = one longer call
    fresh, _ = model(x[:, 8:])
    assert not torch.allclose(fresh, b, atol=1e-3)
    nll, _ = model(x[:, :-1], None, x[:, 1:])
    assert torch.allclose(nll, -whole[:, :-1].gather(2, x[:, 1:, None])[..., 0], atol=1e-5)


def test_the_adaptive_softmax_gives_the_same_losses_as_its_log_probabilities():
    torch.manual_seed(0)
    model = LanguageModel("lstm", vocab_size=300, emb_size=16, hidden_size=16, tie_weights=False,
                          adaptive_cutoffs=[20, 100]).eval()  # fmt: skip
    x = torch.randint(300, (2, 12))
    logp, _ = model(x)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 12), atol=1e-4)
    nll, _ = model(x[:, :-1], None, x[:, 1:])
    assert torch.allclose(nll, -logp[:, :-1].gather(2, x[:, 1:, None])[..., 0], atol=1e-4)


def test_locked_dropout_uses_one_mask_per_sequence():
    torch.manual_seed(0)
    model = LanguageModel("lstm", vocab_size=10, emb_size=8, hidden_size=8, dropout_emb=0.5).train()
    x = torch.zeros(4, 30, dtype=torch.long)  # one token repeated: every step's embedding is the same
    emb = model.drop_emb(model.embedding(x))
    assert torch.equal(emb[:, :1].expand_as(emb), emb)  # the mask does not change along the sequence
    assert not torch.equal(emb[0], emb[1])  # but differs between sequences


def test_the_language_model_loss_carries_every_stripes_state_into_the_next_step(tmp_path):
    import contextlib

    from rnnddp.config import load_config
    from rnnddp.data.text import prepare_text
    from rnnddp.dist import DistInfo
    from rnnddp.tasks.language_model import LanguageModel as Task

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small text\n" for i in range(400)))
    prepare_text(text, tmp_path / "data")
    cfg = load_config(["task=language_model", f"lm.path={tmp_path / 'data'}", "lm.bptt=8",
                       "train.global_batch_size=4", "model.hidden_size=16", "lm.emb_size=8"])  # fmt: skip
    task = Task(cfg, DistInfo())
    torch.manual_seed(0)
    model = LanguageModel(**{k: v for k, v in task.model_args().items() if k != "name"})
    steps = task.train_batches(task.load().train).epoch(0)
    first, second = next(steps), next(steps)
    assert first.new_epoch and not second.new_epoch
    ctx = contextlib.nullcontext()
    task.loss(model, first, ctx)
    _, state = model(first.inputs)
    assert all(torch.equal(a, b) for a, b in zip(task.carried.state[0], state[0], strict=True))
    loss = task.loss(model, second, ctx)
    carried, _ = model(second.inputs, state, second.targets)
    from_zero, _ = model(second.inputs, None, second.targets)
    assert torch.allclose(loss, carried.mean()) and not torch.allclose(loss, from_zero.mean())
    assert not task.carried.state[0][0].requires_grad  # detached: no gradient into earlier steps
    # The checkpoint entry is every stripe's state in global order; a load gives it back.
    saved = task.state_dict()
    assert saved["carry"][0][0].shape == (
        1,
        4,
        8,
    )  # tied: the top layer has emb_size units and saved["tokenizer"]["kind"] == "char"
    other = Task(cfg, DistInfo())
    other.load_state_dict(saved)
    assert torch.equal(other.carried.state[0][1], task.carried.state[0][1])
