"""Models that leave the job: ``rnnddp-export`` writes a trained network as ONNX or a ``torch.export`` program.

graphs.py: each architecture with its task's input preparation and, for the stateful ones, the state in
and out; recurrence.py: how a graph runs a recurrent stack with the time length left free; write.py:
the exported folder (model file, serving.json), checked in its runtime before it appears; cli.py: the
command. docs/serving.md shows a server that needs only onnxruntime and NumPy.
"""
