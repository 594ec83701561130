"""Export a trained model for serving.

    rnnddp-export RUN_OR_CHECKPOINT --format {onnx,pt2} --out DIR [--dtype fp32|fp16] [key=value ...]

A run directory exports its ``best.pt`` (chosen on validation), else its newest intact checkpoint;
a ``.pt`` file exports itself. DIR (new; never written over) receives ``model.onnx`` or ``model.pt2``
and ``serving.json``: the inputs and outputs with their shapes ("batch" and "time" are free), the
state to feed back (the sine regressor and the language model run chunk by chunk), the class names
or the tokenizer (a BPE model: ``tokenizer.json`` beside it), and what the graph itself does to its
input (scaling, normalisation, the pixel view). The ONNX file holds the same JSON in its metadata
(``rnnddp.serving``), the pt2 archive as its extra file ``serving.json``. Weights are exported in
fp32; ``--dtype fp16`` (pt2 only) halves them, inputs and outputs staying fp32. Before DIR appears,
the file is run in its runtime at other batch sizes and lengths than the traced example and compared
with the network (1e-5; fp16 2e-2). Overrides (``key=value``) apply over the checkpoint's config,
e.g. ``sequences.path=...`` when the prepared folder moved.

Exit codes: 0 written, 2 bad input (one line naming the problem and the fix; nothing written).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rnnddp import dist
from rnnddp.errors import UserError
from rnnddp.export.write import DTYPES, FORMATS, export_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rnnddp-export", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run directory (its best.pt) or a checkpoint file")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx, or pt2 (torch.export)")
    p.add_argument("--out", required=True, type=Path, help="a new folder for the exported model")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="the exported weights' precision (fp32)")
    p.add_argument("overrides", nargs="*", help="key=value applied over the checkpoint's config")
    a = p.parse_args(argv)
    try:
        with warnings.catch_warnings():  # the exporters' notes on tracing are not the user's concern
            warnings.simplefilter("ignore")
            info = export_model(a.target, a.format, a.out, a.dtype, a.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    shapes = ", ".join(f"{t['name']} {t['shape']}" for t in info["inputs"])
    print(f"wrote {a.out / info['file']} and {a.out / 'serving.json'} (task {info['task']}; inputs {shapes})")
    print(f"checked in its runtime against the network: max difference {info['checked_max_difference']:.2g}")
    return 0


if __name__ == "__main__":
    dist.fast_exit(main())
