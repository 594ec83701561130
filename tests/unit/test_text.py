"""rnnddp-prepare --text on the real tiny-shakespeare and PTB files, and on broken ones: tokens memory-mapped."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rnnddp.data import text as text_mod
from rnnddp.data.sequences import open_prepared
from rnnddp.data.text import (
    TEXT_FORMAT,
    PreparedText,
    Tokenizer,
    WordTokenizer,
    encode_file,
    is_text_folder,
    open_text,
    prepare_text,
    token_dtype,
)
from rnnddp.errors import UserError
from rnnddp.prepare import main
from tests.conftest import DATA_ROOT
from tests.sequence_files import tiny_prepared

TEXT = DATA_ROOT / "text"
SHAKESPEARE = TEXT / "tinyshakespeare" / "input.txt"
PTB = TEXT / "ptb"


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("RNNDDP_REQUIRE_DATA"):
            pytest.fail(f"{path} not found")
        pytest.skip(f"{path} not found (set RNNDDP_TEST_DATA to a folder holding text/)")
    return path


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory: pytest.TempPathFactory) -> PreparedText:
    out = tmp_path_factory.mktemp("char") / "shakespeare"
    assert main(["--text", str(_need(SHAKESPEARE)), "--out", str(out)]) == 0
    return open_text(out)


@pytest.fixture(scope="module")
def ptb_word(tmp_path_factory: pytest.TempPathFactory) -> PreparedText:
    _need(PTB)
    out = tmp_path_factory.mktemp("word") / "ptb"
    files = [str(PTB / f"ptb.{s}.txt") for s in ("train", "valid", "test")]
    args = ["--text", files[0], "--val", files[1], "--test", files[2], "--tokenizer", "word", "--out", str(out)]
    assert main(args) == 0
    return open_text(out)


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60,000 bytes of tiny-shakespeare (ASCII), cut after a line."""
    raw = _need(SHAKESPEARE).read_bytes()[:60_000]
    path = tmp_path_factory.mktemp("slice") / "slice.txt"
    path.write_bytes(raw[: raw.rfind(b"\n") + 1])
    return path


def test_char_tiny_shakespeare_carves_the_last_tenth_in_order(shakespeare_char: PreparedText) -> None:
    data = shakespeare_char
    m = data.manifest
    raw = SHAKESPEARE.read_bytes()
    text = raw.decode()
    assert m["format"] == TEXT_FORMAT and m["version"] == 1 and m["dtype"] == "uint16"
    assert data.vocab_size == 65 == data.tokenizer.vocab_size and data.tokenizer.kind == "char"
    assert data.tokenizer.to_dict()["vocab"] == sorted(set(text))
    # 90/5/5 of the bytes, each cut just after the next newline; together exactly the file, in order.
    ranges = m["source"]["byte_ranges"]
    size = len(raw)
    for name, frac in (("val", 0.90), ("test", 0.95)):
        cut = ranges[name][0]
        assert raw[cut - 1 : cut] == b"\n" and b"\n" not in raw[int(size * frac) : cut - 1]
    splits = {n: data.split(n) for n in ("train", "val", "test")}
    assert sum(s.characters for s in splits.values()) == 1_115_394 == len(text)
    assert sum(len(s) for s in splits.values()) == 1_115_394
    assert "".join(data.tokenizer.decode(s.tokens) for s in splits.values()) == text
    train = splits["train"]
    assert isinstance(train.tokens, np.memmap) and not train.tokens.flags.writeable and train.to("cpu") is train
    assert len(train) == m["splits"]["train"]["tokens"] == m["splits"]["train"]["bytes"]
    assert m["source"]["val"] == "last 10% of train, first half"
    assert is_text_folder(data.path) and not any(p.name.startswith(".") for p in data.path.parent.iterdir())


def test_main_prints_one_summary(slice_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["--text", str(slice_path), "--tokenizer", "word", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = open_text(out).manifest
    assert lines[0] == f"wrote {out}: tokenizer word, vocabulary {m['vocab_size']}" and len(lines) == 4
    st = m["splits"]["train"]
    assert lines[1] == f"  train {st['tokens']:8d} tokens ({st['characters']} characters)"


def test_word_ptb_counts_as_pytorch_examples(ptb_word: PreparedText) -> None:
    data = ptb_word
    m = data.manifest
    tok = data.tokenizer
    assert isinstance(tok, WordTokenizer)
    assert data.vocab_size == 10_000 and tok.words.count("<unk>") == 1  # PTB's 9999 words (with <unk>) + <eos>
    assert {n: st["tokens"] for n, st in m["splits"].items()} == {"train": 929_589, "val": 73_760, "test": 82_430}
    assert m["source"]["val"].endswith("ptb.valid.txt") and "byte_ranges" not in m["source"]
    # The words, in order, are pytorch/examples' Corpus: line.split() + ['<eos>'] for every line.
    for name, file in (("train", "ptb.train.txt"), ("test", "ptb.test.txt")):
        words = [w for line in (PTB / file).open() for w in [*line.split(), "<eos>"]]
        ids = np.asarray(data.split(name).tokens)
        assert len(ids) == len(words) and [tok.words[i] for i in ids[:2000]] == words[:2000]
        assert ids.tolist() == [tok.index[w] for w in words]
    assert data.split("val").characters == (PTB / "ptb.valid.txt").stat().st_size  # ASCII


def test_word_conventions_and_vocab_size(tmp_path: Path) -> None:
    tok = WordTokenizer.from_counts(Counter({"b": 3, "a": 3, "c": 1, "<unk>": 5}), vocab_size=4)
    assert tok.words == ["<unk>", "<eos>", "a", "b"]  # most frequent, ties by the word; <unk> not twice
    ids = tok.encode("a b\n\nc  a")  # an empty line is <eos>; the last line gets one without a newline
    assert [tok.words[i] for i in ids] == ["a", "b", "<eos>", "<eos>", "<unk>", "a", "<eos>"]
    assert tok.encode("a\n") == tok.encode("a")
    assert tok.decode(ids) == "a b\n\n<unk> a\n"
    assert tok.unknown("a c d\n") == ["c", "d"]
    f = tmp_path / "t.txt"
    f.write_text("x y\n" * 60 + "x z\n" * 30 + "w w\n" * 10)  # train: x 90, y 60, z 30, w ...
    out = prepare_text(f, tmp_path / "o", "word", vocab_size=4)
    data = open_text(out)
    assert data.tokenizer.to_dict()["vocab"] == ["<unk>", "<eos>", "x", "y"]  # the two most frequent words
    decoded = data.tokenizer.decode(data.split("train").tokens)
    assert decoded.startswith("x y\n" * 60 + "x <unk>\n" * 30) and decoded.endswith("<unk> <unk>\n")
    # The carve: 95% of 400 bytes is the start of line 96; the cut moves on to just after its newline.
    assert data.tokenizer.decode(data.split("test").tokens) == "<unk> <unk>\n" * 4


def test_bpe_roundtrips_and_encodes_like_the_whole_text(slice_path: Path, tmp_path: Path) -> None:
    out = prepare_text(slice_path, tmp_path / "bpe", "bpe", vocab_size=300)
    data = open_text(out)
    tok = data.tokenizer
    assert tok.kind == "bpe" and data.vocab_size == 300 and data.manifest["dtype"] == "uint16"
    assert (out / "tokenizer.json").is_file()
    text = slice_path.read_text()
    assert tok.decode(tok.encode(text)) == text and tok.unknown("é€") == []
    odd = "naïve café — 東京\n\n\n  tabs\tand\r\nCRLF"
    assert tok.decode(tok.encode(odd)) == odd  # byte level: any string
    start, end = data.manifest["source"]["byte_ranges"]["train"]
    assert np.asarray(data.split("train").tokens).tolist() == tok.encode(text[start:end])
    assert len(data.split("train")) < data.manifest["splits"]["train"]["characters"] * 0.8  # merges learnt
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(odd) == tok.encode(odd)


def test_dtype_follows_the_vocabulary() -> None:
    assert token_dtype(65) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(2**32) == np.uint32
    with pytest.raises(UserError, match="32-bit"):
        token_dtype(2**32 + 1)


def test_a_uint32_folder_reads_back(tmp_path: Path) -> None:
    # A 72k-word vocabulary (the train part's words): every word distinct.
    f = tmp_path / "many.txt"
    f.write_text("\n".join(" ".join(f"w{i}" for i in range(j, j + 1000)) for j in range(0, 80_000, 1000)) + "\n")
    data = open_text(prepare_text(f, tmp_path / "o", "word"))
    assert data.manifest["dtype"] == "uint32" and data.vocab_size > 65_536
    assert data.split("train").tokens.dtype == np.dtype("<u4")
    assert data.tokenizer.decode(data.split("train").tokens[:3]) == "w0 w1 w2"


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_small_blocks_give_the_same_tokens(
    kind: str, slice_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = 300 if kind == "bpe" else None
    big = open_text(prepare_text(slice_path, tmp_path / "big", kind, vocab))
    monkeypatch.setattr(text_mod, "BLOCK", 64)
    small = open_text(prepare_text(slice_path, tmp_path / "small", kind, vocab))
    assert small.manifest == {**big.manifest, "source": small.manifest["source"]}
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(small.split(name).tokens, big.split(name).tokens)


def test_blocks_without_newlines_cut_between_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_mod, "BLOCK", 7)
    f = tmp_path / "long.txt"
    line = "é€x 😀 ab" * 40  # one line, multi-byte characters across every block edge
    f.write_text(line)
    pieces = list(text_mod._blocks(f))
    assert len(pieces) > 10 and "".join(pieces) == line
    char = Tokenizer.from_dict({"kind": "char", "vocab": sorted(set(line))})
    assert char.decode(encode_file(f, char)) == line
    word = WordTokenizer.from_counts(Counter(line.split()))
    assert word.decode(encode_file(f, word)) == " ".join(line.split()) + "\n"


def test_encode_file_names_characters_the_vocabulary_lacks(tmp_path: Path) -> None:
    char = Tokenizer.from_dict({"kind": "char", "vocab": list("\nabc ")})
    f = tmp_path / "new.txt"
    f.write_text("abc\né€ ab\n")
    with pytest.raises(UserError, match=r"characters not in the model's vocabulary: 'é', '€'"):
        encode_file(f, char)
    with pytest.raises(UserError, match=r"characters not in the vocabulary: 'é'"):
        char.encode("aé")
    word = WordTokenizer(["<unk>", "<eos>", "abc"])
    assert encode_file(f, word).tolist() == [2, 1, 0, 0, 1]


def _bad(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    good = tmp_path / "good.txt"
    good.write_text("hello\nworld\n" * 50)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert "is empty" in _bad(["--text", str(empty)], out, capsys)
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    assert "looks binary (a NUL byte at byte offset 4)" in _bad(["--text", str(binary)], out, capsys)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ça va\n".encode() + "déjà vu\n".encode("latin-1"))
    err = _bad(["--text", str(latin)], out, capsys)
    assert f"{latin}: not UTF-8 at byte offset 8 (0xe9)" in err and "iconv -f latin1 -t utf-8" in err
    # ... also when the bad byte is in the carved test split, and in a val file.
    late = tmp_path / "late.txt"
    late.write_bytes(b"abc\n" * 1000 + b"\xff\n")
    assert "not UTF-8 at byte offset 4000 (0xff)" in _bad(["--text", str(late)], out, capsys)
    both = ["--val", str(latin), "--test", str(good)]
    assert "not UTF-8 at byte offset 8" in _bad(["--text", str(good), *both, "--tokenizer", "word"], out, capsys)
    assert "does not exist" in _bad(["--text", str(tmp_path / "nope.txt")], out, capsys)
    assert "both --val FILE and --test FILE" in _bad(["--text", str(good), "--val", str(good)], out, capsys)
    assert "not both" in _bad(["--text", str(good), "--train", str(good), "--test", str(good)], out, capsys)
    assert "at least 257" in _bad(["--text", str(good), "--tokenizer", "bpe", "--vocab-size", "256"], out, capsys)
    assert "at least 3" in _bad(["--text", str(good), "--tokenizer", "word", "--vocab-size", "2"], out, capsys)
    assert "32-bit" in _bad(["--text", str(good), "--tokenizer", "word", "--vocab-size", str(2**32 + 1)], out, capsys)
    assert "applies to --tokenizer word and bpe" in _bad(["--text", str(good), "--vocab-size", "9"], out, capsys)
    short = tmp_path / "short.txt"
    short.write_text("one line only\n")
    assert "too short to carve" in _bad(["--text", str(short)], out, capsys)
    assert "give --train FILE and --test FILE" in _bad([], out, capsys)
    out.mkdir()  # an existing --out: refused, left as it was
    assert main(["--text", str(good), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1 and list(out.iterdir()) == []


def test_text_and_sequence_folders_refuse_each_other(shakespeare_char: PreparedText, tmp_path: Path) -> None:
    seq = tiny_prepared(tmp_path)
    with pytest.raises(UserError, match=r"holds prepared sequences, not text; train it with task="):
        open_text(seq)
    with pytest.raises(UserError, match=r"sequences.path=.* holds prepared text, not sequences; .*task=language_model"):
        open_prepared(shakespeare_char.path)
    assert not is_text_folder(seq) and not is_text_folder(tmp_path / "none")
    with pytest.raises(UserError, match=r"is not a prepared text folder \(no manifest.json\); make one with"):
        open_text(tmp_path / "none")


def test_open_text_checks_version_and_file_sizes(slice_path: Path, tmp_path: Path) -> None:
    out = prepare_text(slice_path, tmp_path / "c")
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(UserError, match="version 99.*prepare the folder again"):
        open_text(out)
    (out / "manifest.json").write_text(json.dumps(m))
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=r"val.bin has \d+ bytes, its manifest says .*prepare the folder again"):
        open_text(out)
