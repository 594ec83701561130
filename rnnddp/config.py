"""Typed job configuration: schema defaults < YAML file < command-line dotlist.

Each section is a dataclass; each task adds its own section (``rnnddp.tasks``). ``load_config``
returns a ``Config`` object (plain dataclasses, not OmegaConf nodes), and components receive
only their own section. Allowed values of the choice keys come from the registries that define
them (tasks, models, views, data sets, precisions, optimisers, schedules).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rnnddp.dist import BACKENDS, GRAD_SYNC
from rnnddp.errors import UserError
from rnnddp.metrics import WANDB_MODES
from rnnddp.models import CELLS, CLASSIFIERS
from rnnddp.tasks import TASKS
from rnnddp.train.averaging import AVERAGE_MODES
from rnnddp.train.optim import OPTIMIZERS, SCHEDULES
from rnnddp.train.precision import PRECISIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


@dataclass
class ModelConfig:
    name: str = "rnn"  # rnn (recurrent classifier) | cnn (the seed's two-conv CNN; rows/columns views only)
    cell: str = "lstm"  # lstm | gru | rnn
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0  # between stacked layers
    bidirectional: bool = False
    # > 1: LSTM/GRU gate biases by chrono initialisation for memories up to this many steps; 0: PyTorch's
    chrono_init: int = 0


@dataclass
class TrainConfig:
    epochs: int = 4
    max_steps: int = 0  # > 0: stop (and end the schedule) after this many optimiser steps
    global_batch_size: int = 128  # split evenly over ranks
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    tf32: bool = True  # CUDA (Ampere+): TF32 for fp32 matmuls and cuDNN; false = full fp32
    flush_denormals: bool = True  # CPU: denormal floats count as zero (the 784-step views train far faster)
    cuda_graph: bool = False  # CUDA, one process: the whole training step replayed as a CUDA graph
    log_every_steps: int = 50
    max_nonfinite: int = 3  # stop (exit 3) after this many consecutive non-finite losses (GradScaler or not)
    # Signals that stop the job cleanly: checkpoint at a step boundary (within 10 steps), then exit 75.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 0.005
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedConfig:
    name: str = "onecycle"  # constant | cosine | onecycle
    warmup_steps: int = 0  # constant and cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of optim.lr
    pct_start: float = 0.2  # onecycle: fraction of steps spent rising


@dataclass
class AverageConfig:
    # Validation, best.pt and the final test on averaged weights (training goes on with its own):
    # none | ema | asgd (AWD-LSTM's switch to averaging once validation stalls)
    mode: str = "none"
    ema_decay: float = 0.999  # ema: the old average's weight per step
    nonmono: int = 5  # asgd: start when validation is worse than the best before the last nonmono ones
    start_step: int = 0  # ema: start averaging after this step


@dataclass
class EvalConfig:
    every_steps: int = 0  # > 0: also validate every N steps (always after each epoch)
    batch_size: int = 1000
    plots: bool = True  # draw the final test's pictures (run_dir/plots, and W&B); false: skip them (seconds)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # > 0: also save every N steps (always after each epoch)
    keep: int = 3  # newest step checkpoints kept, besides best.pt


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto | online | offline | disabled (auto: online with an API key)
    project: str = "rnnddp"
    entity: str | None = None
    name: str | None = None  # defaults to the job's name
    tags: list[str] = field(default_factory=list)
    init_timeout_s: int = 60  # online: how long to wait for the server before logging offline instead


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    timeout_s: int = 1800  # how long the others wait for rank 0's own work (validation, saves, the test)
    peer_timeout_s: int = 60  # a rank that does not answer a training-step collective by then is lost
    grad_sync: str = "auto"  # auto | allreduce | allgather: how DDP averages gradients (see dist.py)
    # A restart (SLURM requeue, torchrun restart) that finds this many earlier attempts resumed from the same
    # checkpoint without saving a newer one stops instead (exit 2); 0: no limit
    max_stalled_restarts: int = 3


@dataclass
class DebugConfig:
    # Fault injection for tests: SIGKILL rank fail_rank after step fail_at_step, on the first
    # attempt only (TORCHELASTIC_RESTART_COUNT unset or 0), so torchrun's restart can recover.
    fail_at_step: int = 0
    fail_rank: int = 0
    nonfinite_from_step: int = 0  # > 0: the loss is NaN from this step on (tests divergence handling)
    stop_at_step: int = 0  # > 0: rank fail_rank sends itself the first of train.stop_signals after this step
    # > 0: every rank sleeps this long after each step, so a signal sent from outside (a scheduler's
    # preemption in a test) lands mid-run however fast the machine is
    step_delay_s: float = 0.0


@dataclass
class JobConfig:
    seed: int = 0
    name: str = "default"
    run_dir: str | None = None  # defaults to runs/<name>
    resume: str = "auto"  # auto | none | PATH to a checkpoint
    task: str = "classify"  # a name in rnnddp.tasks.TASKS


@dataclass
class TrainingConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _field(f: dataclasses.Field) -> tuple[str, Any, Any]:
    if f.default_factory is not dataclasses.MISSING:
        return f.name, f.type, field(default_factory=f.default_factory)
    return f.name, f.type, field(default=f.default)


# The whole schema: the job's keys, each task's section (from the registry), then the training sections.
Config: Any = dataclasses.make_dataclass(
    "Config",
    [
        *(_field(f) for f in dataclasses.fields(JobConfig)),
        # Tasks may share a section (the sequence tasks share "sequences"): one field each.
        *{t.section: (t.section, t.Section, field(default_factory=t.Section)) for t in TASKS.values()}.values(),
        *(_field(f) for f in dataclasses.fields(TrainingConfig)),
    ],
)
Config.__module__ = __name__  # its annotations (strings) resolve in this module

CHOICES = {
    "task": tuple(TASKS),
    **{key: values for t in TASKS.values() for key, values in t.choices.items()},
    "model.name": tuple(CLASSIFIERS),
    "model.cell": tuple(CELLS),
    "train.precision": PRECISIONS,
    "optim.name": OPTIMIZERS,
    "sched.name": SCHEDULES,
    "average.mode": AVERAGE_MODES,
    "wandb.mode": WANDB_MODES,
    "dist.backend": BACKENDS,
    "dist.grad_sync": GRAD_SYNC,
}
POSITIVE = (
    "train.epochs",
    "train.global_batch_size",
    "train.log_every_steps",
    "model.hidden_size",
    "model.num_layers",
    "eval.batch_size",
    "checkpoint.keep",
    "dist.timeout_s",
    "dist.peer_timeout_s",
    "optim.lr",
    "wandb.init_timeout_s",
    "average.nonmono",
)
NON_NEGATIVE = (
    "train.max_steps",
    "model.chrono_init",
    "train.grad_clip",
    "eval.every_steps",
    "checkpoint.every_steps",
    "optim.weight_decay",
    "sched.warmup_steps",
    "train.max_nonfinite",
    "debug.fail_at_step",
    "debug.fail_rank",
    "debug.nonfinite_from_step",
    "debug.stop_at_step",
    "debug.step_delay_s",
    "dist.max_stalled_restarts",
    "average.start_step",
)
# Keys of earlier versions -> their place now (None: dropped), applied to a checkpoint's stored config.
MOVED = {
    "data.sine_sequences": "sine.sequences",
    "data.sine_test_sequences": "sine.test_sequences",
    "data.sine_length": "sine.length",
    "data.chunk_len": "sine.chunk_len",
    "data.num_workers": None,
}


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Separate ``--config PATH`` / ``config=PATH`` from the dotlist overrides."""
    config_path: str | None = None
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config_path = next(it, None)
            if config_path is None:
                raise UserError("--config needs a path: --config configs/default.yaml")
        elif arg.startswith("--config=") or arg.startswith("config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--") or "=" not in arg:
            raise UserError(
                f"unexpected argument {arg!r}: pass overrides as key=value "
                "(e.g. train.epochs=3) and a file as --config PATH"
            )
        else:
            overrides.append(arg)
    return config_path, overrides


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        known = _all_keys(OmegaConf.structured(Config))
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown config key {key!r}{hint}; the keys are listed in configs/default.yaml"
    first = str(err).splitlines()[0]
    return f"bad value for config key {key!r}: {first}"


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys.extend(_all_keys(v, full + "."))
    return keys


def load_config(argv: list[str]) -> Any:
    """Build the job's Config from the command line (raises UserError with one line)."""
    config_path, overrides = split_args(argv)
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass an existing YAML file with --config PATH")
    cfg = OmegaConf.structured(Config)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise UserError(f"cannot read config {str(path)!r}: {str(e).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.merge(cfg, file_cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"{_explain(e)} (in {path})") from None
    return _with_overrides(cfg, overrides)


def from_saved(saved: dict, overrides: list[str]) -> Any:
    """A checkpoint's stored config (a plain dict) over the schema defaults, then ``key=value`` overrides.

    Keys added to the schema after the checkpoint was written take their defaults (e.g. MNIST rows);
    keys that moved since (``MOVED``) are read from their old place.
    """
    saved = migrate(saved)
    cfg = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(cfg, saved)
    except OmegaConfBaseException as e:
        raise UserError(f"the checkpoint's stored config does not fit this version: {_explain(e)}") from None
    for arg in overrides:
        if "=" not in arg or arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: pass overrides as key=value (e.g. data.root=../shared/data)")
    return _with_overrides(cfg, overrides)


def saved_dict(saved: dict) -> dict:
    """A checkpoint's stored config as this version's full tree (plain types): moved keys in their place,
    keys added since at their defaults. Not validated: it describes a run that was, not one to start."""
    try:
        tree = OmegaConf.merge(OmegaConf.structured(Config), migrate(saved))
    except OmegaConfBaseException as e:
        raise UserError(f"the checkpoint's stored config does not fit this version: {_explain(e)}") from None
    return OmegaConf.to_container(tree)  # type: ignore[return-value]


def migrate(saved: dict) -> dict:
    """A stored config with the keys of earlier versions moved to where they are now."""
    tree = OmegaConf.create(saved)
    for old, new in MOVED.items():
        value = OmegaConf.select(tree, old)
        if value is None:
            continue
        section, key = old.split(".")
        del tree[section][key]
        if new is not None:
            OmegaConf.update(tree, new, value, force_add=True)
    return OmegaConf.to_container(tree)  # type: ignore[return-value]


def _with_overrides(cfg: DictConfig, overrides: list[str]) -> Any:
    """Merge ``key=value`` overrides, resolve interpolations, validate (one-line errors) and make the object."""
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(_explain(e)) from None
    for key, choices in CHOICES.items():
        value = str(OmegaConf.select(cfg, key)).lower()
        if value not in choices:
            raise UserError(f"bad value for config key {key!r}: {value!r}; choose one of {', '.join(choices)}")
        OmegaConf.update(cfg, key, value)  # the code compares lower-case names: Sine_Regression works too
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", cfg.name)
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Any) -> None:
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise UserError(f"bad value for config key {key!r}: must be > 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"bad value for config key {key!r}: must be >= 0")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise UserError("bad value for config key 'model.dropout': must be in [0, 1)")
    if not 0.0 < cfg.sched.pct_start < 1.0:
        raise UserError("bad value for config key 'sched.pct_start': must be in (0, 1)")
    if not 0.0 <= cfg.average.ema_decay < 1.0:
        raise UserError("bad value for config key 'average.ema_decay': must be in [0, 1)")
    for name in cfg.train.stop_signals:
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            raise UserError(
                f"bad value for config key 'train.stop_signals': {name!r} is not a signal name (e.g. SIGTERM)"
            )
    chrono = cfg.model.chrono_init
    if chrono and (chrono < 2 or cfg.model.name != "rnn" or cfg.model.cell not in ("lstm", "gru")):
        raise UserError(
            "model.chrono_init needs model.name=rnn with model.cell=lstm or gru and a value >= 2 (the longest "
            "memory in steps, e.g. 784 for the pixel views); set model.chrono_init=0 to turn it off"
        )
    if len(cfg.optim.betas) != 2:
        raise UserError("bad value for config key 'optim.betas': give two numbers, e.g. [0.9,0.999]")
    TASKS[cfg.task].validate(cfg)


def to_dict(cfg: Any) -> dict:
    """The config as plain Python types (safe to store in a checkpoint)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
