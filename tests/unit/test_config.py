from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rnnddp.config import DEFAULT_CONFIG, Config, load_config
from rnnddp.errors import UserError
from tests.conftest import in_process_trainer, run_job


def test_default_yaml_lists_exactly_the_schema_defaults():
    # The documented reference and the schema cannot drift apart.
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    assert OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG)) == schema


def test_merge_order_defaults_then_file_then_cli(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  global_batch_size: 32\nmodel:\n  hidden_size: 16\n")
    cfg = load_config(["--config", str(f), "train.epochs=3"])
    assert cfg.train.epochs == 3  # CLI beats file
    assert cfg.train.global_batch_size == 32  # file beats default
    assert cfg.model.hidden_size == 16
    assert cfg.optim.name == "adamw"  # untouched default
    assert cfg.run_dir == "runs/default"
    assert load_config([f"config={f}"]).train.epochs == 7  # the config=PATH spelling


def test_run_dir_follows_name():
    assert load_config(["name=exp1"]).run_dir == "runs/exp1"
    assert load_config(["name=exp1", "run_dir=/tmp/x"]).run_dir == "/tmp/x"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        (["nosuch=1"], "unknown config key 'nosuch'"),
        (["train.epochs=three"], "bad value for config key 'train.epochs'"),
        (["optim.lr=fast"], "bad value for config key 'optim.lr'"),
        (["train.precision=fp8"], "choose one of auto, fp32, bf16, fp16"),
        (["train.global_batch_size=0"], "'train.global_batch_size': must be > 0"),
        (["train.epochs"], "pass overrides as key=value"),
        (["model.chrono_init=1"], "model.chrono_init needs model.name=rnn with model.cell=lstm or gru"),
        (["model.chrono_init=784", "model.cell=rnn"], "set model.chrono_init=0 to turn it off"),
        (["model.chrono_init=784", "model.name=cnn"], "model.chrono_init needs model.name=rnn"),
    ],
)
def test_bad_config_is_one_clear_line(args, needle):
    with pytest.raises(UserError) as e:
        load_config(args)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  hiden_size: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.hiden_size'.*bad.yaml"):
        load_config(["--config", str(f)])


@pytest.mark.parametrize("args", [["train.epoch=3"], ["train.epochs=abc"], ["--config", "/nonexistent.yaml"]])
def test_cli_exits_2_with_one_line(args, tmp_path: Path):
    proc = run_job([*args, f"run_dir={tmp_path}/run"], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists()


def test_cuda_graph_on_a_cpu_warns_and_trains_eagerly(tmp_path: Path, mnist_root, caplog):
    import torch

    from rnnddp.train.cuda_graph import GraphedStep

    with caplog.at_level("WARNING", logger="rnnddp"):
        trainer = in_process_trainer(mnist_root, tmp_path, ["train.cuda_graph=true"])
    assert not isinstance(trainer.step, GraphedStep)
    assert "train.cuda_graph=true ignored: it needs a CUDA device" in caplog.text
    assert torch.isfinite(trainer.train_step(next(trainer.batches.epoch(0))))
