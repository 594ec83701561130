"""Write an exported model folder: the graph file, serving.json, and the tokenizer file a BPE model needs.

The folder appears whole or not at all (written beside ``out``, checked, then renamed). Before the
rename the file is loaded in its runtime (onnxruntime for ONNX, ``torch.export.load`` for pt2) and
run at batch sizes and lengths other than the export's example, against the eager network; a
mismatch is a bug in the export and stops it (exit 1), with nothing left behind.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnddp.data.formats import staged_folder
from rnnddp.errors import UserError, require_writable
from rnnddp.evaluate import Restored, model_checkpoint, restore
from rnnddp.export.graphs import Graph, Tensor, build_graph
from rnnddp.export.recurrence import run_modules, run_scan

SERVING_FORMAT = 1
FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
DTYPES = ("fp32", "fp16")
EXAMPLE = (2, 5)  # the (batch, time) the graph is traced at; the checks use others
CHECKS = ((3, 11), (1, 1), (5, 3))
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2}  # max abs difference from the eager fp32 network (fp16: its rounding)


def example_inputs(graph: Graph, batch: int, time: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's shapes and ranges (lengths: one full, the others drawn)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in graph.inputs:
        shape = [batch if d == "batch" else time if d == "time" else int(d) for d in t.shape]
        if t.name == "lengths":
            n = torch.randint(1, time + 1, shape, generator=gen)
            n[0] = time
            out.append(n)
        elif t.dtype == "float32":
            out.append(torch.randn(shape, generator=gen))
        else:
            dtype = torch.uint8 if t.dtype == "uint8" else torch.int64
            out.append(torch.randint(0, int(t.high or 2), shape, generator=gen).to(dtype))
    return tuple(out)


def serving_info(r: Restored, graph: Graph, meta: dict[str, Any], fmt: str, dtype: str) -> dict[str, Any]:
    return {
        "serving_format": SERVING_FORMAT,
        "task": r.cfg.task,
        "format": fmt,
        "file": FORMATS[fmt],
        "dtype": {"fp32": "float32", "fp16": "float16 weights, float32 inputs and outputs"}[dtype],
        "checkpoint": {
            "path": str(r.path),
            "step": r.state.get("global_step"),
            "averaged_weights": r.state.get("averaged_model") is not None,
        },
        "model": r.state["model_args"],
        "inputs": [t.__dict__ for t in graph.inputs],
        "outputs": [t.__dict__ for t in graph.outputs],
        "state": [{"input": i, "output": o} for i, o in graph.state],
        **meta,
    }


class Half(nn.Module):
    """The network in fp16, its float inputs and outputs in fp32 (what a caller holds)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.module(*(x.half() if x.is_floating_point() else x for x in inputs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _dims(t: Tensor) -> dict[int, str]:
    return {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}


def write_onnx(graph: Graph, examples: tuple[torch.Tensor, ...], file: Path, info: dict[str, Any]) -> None:
    import onnx

    # The TorchScript-based exporter: it writes ONNX's LSTM/GRU/RNN operators with the time length free. The
    # dynamo-based one fixes the time length of bidirectional and plain-RNN layers to the example's (docs/serving.md).
    torch.onnx.export(
        graph.module,
        examples,
        str(file),
        dynamo=False,
        input_names=[t.name for t in graph.inputs],
        output_names=[t.name for t in graph.outputs],
        dynamic_axes={t.name: _dims(t) for t in graph.inputs + graph.outputs if _dims(t)},
    )
    proto = onnx.load(str(file))
    for key, value in (("rnnddp.serving", json.dumps(info)), ("rnnddp.task", info["task"])):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(file))


def write_pt2(graph: Graph, examples: tuple[torch.Tensor, ...], file: Path, info: dict[str, Any]) -> None:
    dims = {"batch": torch.export.Dim("batch", min=1), "time": torch.export.Dim("time", min=1)}
    shapes: tuple = tuple({i: dims[d] for i, d in _dims(t).items()} or None for t in graph.inputs)
    params = inspect.signature(graph.module.forward).parameters.values()
    fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # forward(x, *state): the state's shapes as one entry
        shapes = (*shapes[:fixed], shapes[fixed:])
    torch._dynamo.reset()  # an earlier export's compiled scan would carry its lengths in as guards
    program = torch.export.export(graph.module, examples, dynamic_shapes=shapes)
    torch.export.save(program, str(file), extra_files={"serving.json": json.dumps(info)})


def run_exported(fmt: str, file: Path, graph: Graph) -> Any:
    """A function from the graph's inputs (tensors) to its outputs (numpy), through the saved file's runtime."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        names = [t.name for t in graph.inputs]
        return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})
    program = torch.export.load(str(file)).module()

    def run(*xs: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():  # a served model needs no gradient (and the scan then skips building one)
            out = program(*xs)
        return [o.detach().numpy() for o in (out if isinstance(out, tuple | list) else (out,))]

    return run


def check(fmt: str, file: Path, graph: Graph, eager: nn.Module, dtype: str) -> float:
    """The largest difference from the eager network over shapes unlike the example's (raises if too large)."""
    run = run_exported(fmt, file, graph)
    worst = 0.0
    for batch, time in CHECKS:
        xs = example_inputs(graph, batch, time, seed=batch * 100 + time)
        with torch.no_grad():
            want = eager(*xs)
        want = want if isinstance(want, tuple) else (want,)
        for w, g in zip(want, run(*xs), strict=True):
            worst = max(worst, float(np.abs(w.numpy() - g).max()))
    if worst > TOLERANCE[dtype]:
        raise RuntimeError(
            f"the exported {fmt} model differs from the network by {worst:.3g} (allowed {TOLERANCE[dtype]})"
        )
    return worst


def export_model(
    target: str | Path, fmt: str, out: Path, dtype: str = "fp32", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Export ``target`` (a run directory: its best.pt, else its newest intact checkpoint) to folder ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if fmt == "onnx" and dtype == "fp16":
        raise UserError(
            "--dtype fp16 with --format onnx: onnxruntime's CPU LSTM/GRU/RNN kernels take float32 only; "
            "export fp32, or fp16 with --format pt2"
        )
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise UserError(f"--format onnx needs {e.name}: pip install 'rnnddp[export]'") from None
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; give a new folder (an export never writes over one)")
    require_writable(out.parent, "give --out a folder that can be written")
    r = restore(model_checkpoint(target), overrides or [], torch.device("cpu"))
    serving = r.task.serving()
    net = r.module.float().eval()
    reference = build_graph(net, serving.prepare, serving.given, serving.lengths, run_modules)
    run = run_modules if fmt == "onnx" else run_scan
    graph = build_graph(copy.deepcopy(net), serving.prepare, serving.given, serving.lengths, run)
    if dtype == "fp16":
        graph.module = Half(graph.module)
    info = serving_info(r, graph, serving.meta, fmt, dtype)
    tokenizer = info.get("tokenizer") or {}
    if tokenizer.get("kind") == "bpe":  # the tokenizers library's own file, readable from any language
        info["tokenizer"] = {"kind": "bpe", "file": "tokenizer.json"}
    examples = example_inputs(graph, *EXAMPLE)
    with staged_folder(out) as tmp:
        file = tmp / FORMATS[fmt]
        (write_onnx if fmt == "onnx" else write_pt2)(graph, examples, file, info)
        info["checked_max_difference"] = check(fmt, file, graph, reference.module.eval(), dtype)
        (tmp / "serving.json").write_text(json.dumps(info, indent=2) + "\n")
        if "tokenizers" in tokenizer:
            (tmp / "tokenizer.json").write_text(tokenizer["tokenizers"])
    return info
