"""Continue a text with a trained language model.

    rnnddp-generate RUN_OR_CHECKPOINT --prompt TEXT --tokens N [--temperature T] [--top-k K] [--seed S]

A run directory uses its ``best.pt`` (chosen on validation), else its newest intact checkpoint. The
checkpoint carries its tokenizer, so no data folder is needed. The prompt is read through the model
with the state carried, then ``N`` tokens are drawn one at a time: temperature 0 takes the most likely
token (greedy), otherwise a draw from the softmax at that temperature among the ``K`` most likely
(``--top-k``, 0 = all). The same seed gives the same text. A prompt with characters a character-level
vocabulary lacks is refused (naming them); words a word-level vocabulary lacks become ``<unk>`` (named
on stderr); a byte-level BPE takes any text.

Exit codes: 0 printed, 2 bad input (one line naming the problem and the fix).
"""

from __future__ import annotations

import argparse
import sys

import torch

from rnnddp import dist
from rnnddp.errors import UserError
from rnnddp.evaluate import Restored, model_checkpoint, restore
from rnnddp.tasks.language_model import LanguageModel, next_token_distribution


@torch.no_grad()
def generate(
    r: Restored, prompt: str, tokens: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0
) -> tuple[list[int], list[str]]:
    """(the new tokens' ids, the prompt's pieces the vocabulary lacks). Raises UserError on bad input."""
    task = r.task
    if not isinstance(task, LanguageModel) or task.tokenizer is None:
        raise UserError(f"{r.path} is a task={r.cfg.task} model; rnnddp-generate continues texts with a language model")
    tok = task.tokenizer
    unknown = tok.unknown(prompt)
    if unknown and tok.kind == "char":
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise UserError(
            f"the prompt has character(s) the model's vocabulary lacks: {shown}; remove or replace them "
            f"(the model knows {tok.vocab_size} characters, those of its training text)"
        )
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty; give --prompt TEXT with at least one token")
    gen = torch.Generator().manual_seed(seed)
    logp, state = r.module(torch.tensor([ids]))
    out: list[int] = []
    for _ in range(tokens):
        last = logp[0, -1]
        if temperature == 0:
            nxt = int(torch.argmax(last))
        else:
            nxt = int(torch.multinomial(next_token_distribution(last, temperature, top_k), 1, generator=gen))
        out.append(nxt)
        logp, state = r.module(torch.tensor([[nxt]]), state)
    return out, unknown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rnnddp-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run directory (its best.pt) or a checkpoint file")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate (200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy; higher: more varied (1.0)")
    p.add_argument("--top-k", type=int, default=0, help="draw among the k most likely tokens; 0: all (0)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed: the same seed, the same text (0)")
    p.add_argument("overrides", nargs="*", help="key=value applied over the checkpoint's config")
    a = p.parse_args(argv)
    dist.flush_denormals()
    try:
        if a.tokens < 0 or a.temperature < 0 or a.top_k < 0:
            raise UserError("--tokens, --temperature and --top-k must be >= 0")
        r = restore(model_checkpoint(a.target), a.overrides, torch.device("cpu"))
        ids, unknown = generate(r, a.prompt, a.tokens, a.temperature, a.top_k, a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if unknown:
        print(f"note: not in the vocabulary, read as <unk>: {', '.join(unknown[:10])}", file=sys.stderr)
    tok = r.task.tokenizer
    space = tok.kind == "word" and ids and not a.prompt[-1:].isspace()  # words are joined by spaces
    print(a.prompt + (" " if space else "") + tok.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
