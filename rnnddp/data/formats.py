"""The names prepared folders carry in their manifest's ``format``: which reader takes a folder."""

SEQUENCES_FORMAT = "rnnddp-sequences"  # rnnddp-prepare --train/--test (rnnddp/data/sequences.py)
TEXT_FORMAT = "rnnddp-text"  # rnnddp-prepare --text (rnnddp/data/text.py)
