"""Prepared text for language models: a UTF-8 file -> tokens on disk, memory-mapped, read by each rank in place.

    rnnddp-prepare --text input.txt --tokenizer char --out data/shakespeare_char
    rnnddp-prepare --text ptb.train.txt --val ptb.valid.txt --test ptb.test.txt --tokenizer word --out data/ptb
    rnnddp-prepare --text input.txt --tokenizer bpe --vocab-size 4096 --out data/shakespeare_bpe

    DIR/manifest.json       format, version, the tokenizer (self-contained), vocabulary size, token dtype,
                            tokens / source bytes / characters per split, where each split came from
    DIR/<split>.bin         the split's tokens end to end: raw little-endian uint16 (vocabulary <= 65536)
                            or uint32, as nanoGPT's train.bin; ``np.memmap(f, dtype, mode="r")`` maps it
    DIR/tokenizer.json      bpe only: the ``tokenizers`` file, for your own tools

Tokenizers:

* ``char``: one token per character; the vocabulary is the sorted distinct characters of every split
  being prepared (as nanoGPT's shakespeare_char does), so no character of the data set is unknown.
* ``word``: PTB's conventions (pytorch/examples word_language_model): each line split on whitespace
  with ``<eos>`` appended (the last line too, without a trailing newline; a line ends at a newline,
  a carriage return before it is whitespace); words outside the vocabulary become ``<unk>``. The
  vocabulary comes from the train split: every word, or with ``--vocab-size N`` the N - 2 most
  frequent (ties by the word) plus ``<unk>`` and ``<eos>``.
* ``bpe``: byte-level BPE (GPT-2's pre-tokenizer, the ``tokenizers`` library) trained on the train
  split; any string encodes, and decoding gives it back exactly. Default vocabulary 4096.

Without ``--val``/``--test`` the last 10% of the file becomes validation and test, 5% each, in order
(never shuffled): cut at 90% and 95% of its bytes, each cut moved forward to just after the next
newline. The vocabulary (word, bpe) comes from the train part alone.

The input is read in blocks (about ``BLOCK`` bytes, cut after a newline), and tokens are appended to
each split's file block by block, so a corpus larger than memory prepares in bounded memory. The
folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rnnddp.data.formats import SEQUENCES_FORMAT, TEXT_FORMAT, staged_folder
from rnnddp.errors import UserError, require_writable

TEXT_VERSION = 1
TOKENIZERS = ("char", "word", "bpe")
SPLITS = ("train", "val", "test")
UNK, EOS = "<unk>", "<eos>"
BPE_DEFAULT_VOCAB = 4096
MIN_VOCAB = {"word": 3, "bpe": 257}  # word: <unk>, <eos> and one word; bpe: the 256 bytes and one merge
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most
BLOCK = 1 << 20  # bytes read at a time: memory stays bounded whatever the file's size
BPE_PIECE = 1 << 16  # characters per encode_batch item (the library encodes the items in parallel)
# Bytes that are neither whitespace nor part of a multi-byte character: a newline between two of them
# is its own BPE pre-token, so cutting after it changes no token (see _cut).
_SOLID = frozenset(range(0x21, 0x7F))
_SAFE_NEWLINE = re.compile(r"(?<=\S)\n(?=\S)")
_CARVED = {"val": "last 10% of train, first half", "test": "last 10% of train, second half"}


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype for token ids below ``vocab_size``: uint16 up to 65536 tokens, else uint32."""
    if vocab_size > MAX_VOCAB:
        raise UserError(
            f"a vocabulary of {vocab_size} tokens does not fit 32-bit token ids (at most 2**32); "
            "give a smaller --vocab-size"
        )
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---------------------------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Text <-> token ids. ``from_dict(to_dict())`` rebuilds it: the manifest holds all it needs."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as int64 array."""
        return np.concatenate([np.zeros(0, np.int64), *self.encode_chunks([text])])

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """The tokens of the text ``chunks`` make end to end, an int64 array at a time."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def unknown(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` the vocabulary lacks (sorted)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"tokenizer {self.kind}, vocabulary {self.vocab_size}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        kind = d.get("kind")
        if kind == "char":
            return CharTokenizer(list(d["vocab"]))
        if kind == "word":
            return WordTokenizer(list(d["vocab"]))
        if kind == "bpe":
            return BpeTokenizer.from_str(d["tokenizers"])
        raise ValueError(f"unknown tokenizer kind {kind!r} (known: {', '.join(TOKENIZERS)})")


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("a char vocabulary holds distinct single characters")
        self.chars = chars
        self._known = frozenset(chars)
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codes)  # ids by code point, for searchsorted
        self._codes = codes[self._order]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        for text in chunks:
            # Code points, then their ids by one sorted lookup: a megabyte in milliseconds.
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
            if not len(self._codes):
                if len(codes):
                    raise UserError(f"characters not in the vocabulary: {_names(self.unknown(text))}")
                yield codes
                continue
            at = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
            if not np.array_equal(self._codes[at], codes):
                raise UserError(f"characters not in the vocabulary: {_names(self.unknown(text))}")
            yield self._order[at]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self._known)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "vocab": self.chars}


def _word_runs(chunks: Iterable[str]) -> Iterator[list[str]]:
    """PTB's words of the text ``chunks`` make end to end: ``line.split() + ['<eos>']`` for every line.

    A chunk may end inside a line, or inside a word (a block with no newline): the unfinished word
    waits for the next chunk, and the line's ``<eos>`` for its newline (or the end of the text).
    """
    carry = ""
    open_line = False  # text after the last newline: the last line needs its <eos> at the end
    for chunk in chunks:
        text = carry + chunk
        nl = text.rfind("\n")
        words: list[str] = []
        if nl >= 0:
            for line in text[:nl].split("\n"):
                words += line.split()
                words.append(EOS)
        rest = text[nl + 1 :]
        parts = rest.split()
        carry = parts.pop() if parts and not rest[-1].isspace() else ""
        words += parts
        open_line = bool(rest)
        yield words
    if open_line:
        yield [carry, EOS] if carry else [EOS]


class WordTokenizer(Tokenizer):
    kind = "word"

    def __init__(self, words: list[str]) -> None:
        if UNK not in words or EOS not in words or len(set(words)) != len(words):
            raise ValueError(f"a word vocabulary holds distinct words, {UNK} and {EOS} among them")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.unk, self.eos = self.index[UNK], self.index[EOS]

    @classmethod
    def from_counts(cls, counts: Counter[str], vocab_size: int | None = None) -> WordTokenizer:
        """``<unk>``, ``<eos>``, then the words by falling count (ties by the word); ``vocab_size`` caps the total."""
        ranked = sorted((w for w in counts if w not in (UNK, EOS)), key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - 2]
        return cls([UNK, EOS, *ranked])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        get, unk = self.index.get, self.unk
        for words in _word_runs(chunks):
            yield np.fromiter((get(w, unk) for w in words), dtype=np.int64, count=len(words))

    def decode(self, ids: Iterable[int]) -> str:
        out, line = [], []
        for i in ids:
            if int(i) == self.eos:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[int(i)])
        return "".join(out) + " ".join(line)

    def unknown(self, text: str) -> list[str]:
        return sorted({w for words in _word_runs([text]) for w in words} - self.index.keys())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "word", "vocab": self.words}


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError("--tokenizer bpe needs the tokenizers library: pip install 'tokenizers>=0.15'") from None
    return tokenizers


class BpeTokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, tok: Any) -> None:
        self.tok = tok  # a tokenizers.Tokenizer

    @classmethod
    def from_str(cls, s: str) -> BpeTokenizer:
        return cls(_tokenizers().Tokenizer.from_str(s))

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> BpeTokenizer:
        """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) learnt from the text ``chunks`` make."""
        t = _tokenizers()
        tok = t.Tokenizer(t.models.BPE())
        tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = t.decoders.ByteLevel()
        trainer = t.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(),  # every byte: any string encodes
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def encode_chunks(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        for text in chunks:
            pieces = _safe_pieces(text, BPE_PIECE)
            if len(pieces) == 1:
                yield np.array(self.tok.encode(text).ids, dtype=np.int64)
            else:  # in parallel; cut where no pre-token spans, so the tokens are those of the whole text
                yield np.array([i for e in self.tok.encode_batch(pieces) for i in e.ids], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids]))

    def unknown(self, text: str) -> list[str]:
        return []  # byte-level: every string encodes

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "tokenizers": self.tok.to_str()}


def _safe_pieces(text: str, size: int) -> list[str]:
    """``text`` in pieces of about ``size`` characters, each cut after a newline between two non-space characters."""
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        m = _SAFE_NEWLINE.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


# ------------------------------------------------------------------------------------------ reading files


class _Part(NamedTuple):
    """A split's text: bytes [start, end) of ``path``."""

    name: str
    path: Path
    start: int
    end: int


def _size(path: Path) -> int:
    """The file's size in bytes; a missing, unreadable or empty file is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give the path of a UTF-8 text file")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the path of a UTF-8 text file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} cannot be read (permission denied); give a readable text file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty; give a UTF-8 text file with some text in it")
    return size


def _decode(path: Path, raw: bytes, offset: int) -> str:
    """``raw`` (read from ``offset`` of ``path``) as text; a NUL byte or bytes that are not UTF-8: a UserError."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UserError(f"{path} looks binary (a NUL byte at byte offset {offset + nul}); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 at byte offset {offset + e.start} (0x{raw[e.start]:02x}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _cut(buf: bytes) -> int:
    """Where the text read so far ends a piece: after a newline, so lines stay whole.

    A newline between two printable ASCII characters is preferred (in the buffer's second half):
    no BPE pre-token spans it, so the tokens of the pieces are those of the whole text. Without a
    newline, before the last character (which may be incomplete); 0: read on.
    """
    last = buf.rfind(b"\n")
    i, half = last, len(buf) // 2
    while i >= max(half, 1):
        if i + 1 < len(buf) and buf[i - 1] in _SOLID and buf[i + 1] in _SOLID:
            return i + 1
        i = buf.rfind(b"\n", half, i)
    if last >= 0:
        return last + 1
    if buf[-1] < 0x80:
        return len(buf)
    p = len(buf) - 1
    while p > 0 and len(buf) - p < 4 and 0x80 <= buf[p] < 0xC0:  # back over continuation bytes to the lead
        p -= 1
    return p


def _blocks(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The text of bytes [start, end) of ``path``, checked (UTF-8, no NUL), in pieces of about ``BLOCK`` bytes."""
    with open(path, "rb") as f:
        if end is None:
            end = os.fstat(f.fileno()).st_size
        f.seek(start)
        left, carry, at = end - start, b"", start  # ``at``: the file offset of carry's first byte
        while True:
            data = f.read(min(BLOCK, left)) if left > 0 else b""
            left -= len(data)
            buf = carry + data
            if not buf:
                return
            done = not data or left <= 0
            cut = len(buf) if done else _cut(buf)
            if cut == 0:  # a character longer than the block: read on
                carry = buf
                continue
            yield _decode(path, buf[:cut], at)
            at, carry = at + cut, buf[cut:]
            if done and not carry:
                return


def _after_newline(path: Path, at: int) -> int:
    """The offset just after the first newline at or after ``at``; without one, the next character boundary."""
    with open(path, "rb") as f:
        f.seek(at)
        pos = at
        while block := f.read(BLOCK):
            i = block.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(block)
        f.seek(at)
        head = f.read(4)
    k = 0
    while k < len(head) and 0x80 <= head[k] < 0xC0:
        k += 1
    return at + k


def _parts(train: Path, val: Path | None, test: Path | None) -> list[_Part]:
    """The three splits; without val and test, carved from the end of train (5% each, cut after a newline)."""
    size = _size(train)
    if val is not None and test is not None:
        return [_Part("train", train, 0, size), _Part("val", val, 0, _size(val)), _Part("test", test, 0, _size(test))]
    c1 = _after_newline(train, int(size * 0.90))
    c2 = _after_newline(train, max(int(size * 0.95), c1))
    return [_Part("train", train, 0, c1), _Part("val", train, c1, c2), _Part("test", train, c2, size)]


def _check_carve(parts: list[_Part]) -> None:
    """An empty carved split is refused (checked after the text itself, whose problems come first)."""
    for p in parts:
        if p.end <= p.start:
            raise UserError(
                f"{p.path}: too short to carve validation and test splits from its last 10% "
                f"(the {p.name} part would be empty: the cuts move to the next newline); "
                "give more text, or --val FILE --test FILE"
            )


def encode_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """All of ``path``'s tokens (int64), read in blocks and checked as ``prepare_text`` checks its input.

    char: a character the vocabulary lacks is a UserError naming them all; word: unknown words are ``<unk>``.
    """
    path = Path(path)
    _size(path)
    if isinstance(tokenizer, CharTokenizer):
        missing: set[str] = set()
        arrays = []
        for piece in _blocks(path):
            gaps = tokenizer.unknown(piece)
            missing.update(gaps)
            if not missing:
                arrays.extend(tokenizer.encode_chunks([piece]))
        if missing:
            raise UserError(
                f"{path}: characters not in the model's vocabulary: {_names(sorted(missing))}; the model's "
                "vocabulary (the characters of the text it was prepared from) lacks them: remove or replace them"
            )
    else:
        arrays = list(tokenizer.encode_chunks(_blocks(path)))
    return np.concatenate([np.zeros(0, np.int64), *arrays])


# -------------------------------------------------------------------------------------------- preparing


def _counted(blocks: Iterator[str], stats: dict[str, int]) -> Iterator[str]:
    for text in blocks:
        stats["characters"] += len(text)
        yield text


def prepare_text(
    train: Path,
    out: Path,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val: Path | None = None,
    test: Path | None = None,
) -> Path:
    """Tokenize ``train`` (and ``val``/``test``, or the carve of train's last 10%) into the folder ``out``.

    Written atomically (a temporary folder beside ``out``, renamed when complete); ``out`` must not exist.
    The module's docstring has the tokenizers and the carve.
    """
    train, out = Path(train), Path(out)
    val, test = (Path(val) if val is not None else None), (Path(test) if test is not None else None)
    if tokenizer not in TOKENIZERS:
        raise UserError(f"--tokenizer {tokenizer}: unknown; give one of {', '.join(TOKENIZERS)}")
    if (val is None) != (test is None):
        raise UserError(
            "give both --val FILE and --test FILE, or neither (then the last 10% of the text becomes validation and test)"
        )
    if vocab_size is not None:
        if tokenizer == "char":
            raise UserError(
                "--vocab-size applies to --tokenizer word and bpe; char's vocabulary is the text's characters"
            )
        if vocab_size < MIN_VOCAB[tokenizer]:
            why = "<unk>, <eos> and one word" if tokenizer == "word" else "the 256 bytes and one merge"
            raise UserError(
                f"--vocab-size {vocab_size}: {tokenizer} needs at least {MIN_VOCAB[tokenizer]} ({why}); "
                "give a larger one"
            )
        token_dtype(vocab_size)  # refuses more than 32-bit ids hold
    elif tokenizer == "bpe":
        vocab_size = BPE_DEFAULT_VOCAB
    if out.exists():
        raise UserError(f"{out} already exists; remove it or give another --out")
    require_writable(out.parent, "give another --out")
    parts = _parts(train, val, test)

    # Pass 1: every split read and checked before anything is learnt or written; characters counted,
    # the char vocabulary (all splits) or the word counts (train) gathered.
    stats = {p.name: {"tokens": 0, "bytes": p.end - p.start, "characters": 0} for p in parts}
    chars: set[str] = set()
    counts: Counter[str] = Counter()
    for p in parts:
        blocks = _counted(_blocks(p.path, p.start, p.end), stats[p.name])
        if tokenizer == "word" and p.name == "train":
            for words in _word_runs(blocks):
                counts.update(words)
        else:
            for text in blocks:
                if tokenizer == "char":
                    chars.update(text)
    _check_carve(parts)
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer(sorted(chars))
    elif tokenizer == "word":
        tok = WordTokenizer.from_counts(counts, vocab_size)
    else:
        assert vocab_size is not None
        tok = BpeTokenizer.train(_blocks(parts[0].path, parts[0].start, parts[0].end), vocab_size)
    del counts, chars
    dtype = token_dtype(tok.vocab_size)

    source = {"train": str(train)}
    for p in parts[1:]:
        source[p.name] = str(p.path) if val is not None else _CARVED[p.name]
    if val is None:
        source["byte_ranges"] = {p.name: [p.start, p.end] for p in parts}

    with staged_folder(out) as tmp:
        # Pass 2: tokens appended to each split's file a block at a time.
        for p in parts:
            with open(tmp / f"{p.name}.bin", "wb") as fh:
                for ids in tok.encode_chunks(_blocks(p.path, p.start, p.end)):
                    fh.write(ids.astype(dtype).tobytes())
                    stats[p.name]["tokens"] += len(ids)
        manifest = {
            "format": TEXT_FORMAT,
            "version": TEXT_VERSION,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "splits": stats,
            "source": source,
            "tokenizer": tok.to_dict(),  # last: its vocabulary runs to thousands of lines
        }
        if isinstance(tok, BpeTokenizer):
            (tmp / "tokenizer.json").write_text(tok.tok.to_str(), encoding="utf-8")
        # ASCII (JSON escapes the rest): any reader decodes it, whatever its locale.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


# -------------------------------------------------------------------------------------------- reading


class TokenStream:
    """One split's tokens, memory-mapped read-only from its ``.bin`` file."""

    def __init__(self, path: Path, dtype: np.dtype, tokens: int, characters: int) -> None:
        self.path = path
        self.characters = characters  # of the source text: bits per character = nats * tokens / characters / ln 2
        self.tokens: np.ndarray = (
            np.memmap(path, dtype=dtype, mode="r", shape=(tokens,)) if tokens else np.zeros(0, dtype=dtype)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device: Any) -> TokenStream:
        """Stays where it is (mapped from disk); batches go to the device as they are read."""
        return self


@dataclass
class PreparedText:
    path: Path
    manifest: dict[str, Any]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        try:
            return Tokenizer.from_dict(self.manifest["tokenizer"])
        except UserError:
            raise
        except Exception as e:  # a hand-edited manifest, or a tokenizers file this library cannot read
            raise UserError(
                f"{self.path / 'manifest.json'}: its tokenizer cannot be read ({e}); "
                "prepare the folder again with rnnddp-prepare --text"
            ) from None

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"]).newbyteorder("<")

    def split(self, name: str) -> TokenStream | None:
        """A split memory-mapped (None when the folder has none of that name)."""
        st = self.manifest["splits"].get(name)
        if st is None:
            return None
        return TokenStream(self.path / f"{name}.bin", self.dtype, int(st["tokens"]), int(st["characters"]))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_text_folder(path: Path) -> bool:
    """Whether ``path`` holds a manifest of prepared text (of any version)."""
    m = _read_manifest(Path(path))
    return m is not None and m.get("format") == TEXT_FORMAT


def open_text(path: Path) -> PreparedText:
    """The manifest of a prepared text folder, checked (and its files' sizes); splits are mapped when asked for."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    again = "prepare the folder again with this rnnddp-prepare --text"
    if not manifest_path.is_file():
        raise UserError(
            f"lm.path={path} is not a prepared text folder (no manifest.json); "
            "make one with: rnnddp-prepare --text FILE --out DIR"
        )
    m = _read_manifest(path)
    if m is None:
        raise UserError(f"{manifest_path} is not valid JSON; {again}")
    if m.get("format") == SEQUENCES_FORMAT:
        raise UserError(
            f"lm.path={path} holds prepared sequences, not text; train it with task=sequence_classification "
            "(or the task its targets need), or prepare text with rnnddp-prepare --text"
        )
    if m.get("format") != TEXT_FORMAT:
        raise UserError(f"{manifest_path} is not an rnnddp text manifest; make one with rnnddp-prepare --text")
    if m.get("version") != TEXT_VERSION:
        raise UserError(
            f"{manifest_path} has format version {m.get('version')}, this rnnddp reads version {TEXT_VERSION}; {again}"
        )
    try:
        itemsize = np.dtype(m["dtype"]).itemsize
        splits = {name: int(st["tokens"]) for name, st in m["splits"].items()}
        int(m["vocab_size"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{manifest_path} lacks its dtype, vocabulary size or split sizes; {again}") from None
    for name, tokens in splits.items():
        f = path / f"{name}.bin"
        size = f.stat().st_size if f.is_file() else None
        if size != tokens * itemsize:
            have = "is missing" if size is None else f"has {size} bytes"
            raise UserError(
                f"{f} {have}, its manifest says {tokens} tokens of {itemsize} byte(s) "
                f"({tokens * itemsize} bytes); {again}"
            )
    return PreparedText(path, m)
