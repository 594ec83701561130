"""How a model is trained, whatever the task: precision, optimiser and schedule, the step, CUDA graphs, the loop."""
