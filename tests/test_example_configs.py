"""The example configuration files under examples/configs/ load into valid configurations, and
the command each one's first line shows runs (at tiny size, the command line overriding)."""

import shlex
from pathlib import Path

import pytest

from negbatch.cli import main
from negbatch.lab import TrainConfig, load_config_file

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.*"))


def test_there_are_toml_and_yaml_examples():
    assert {p.suffix for p in CONFIGS} >= {".toml", ".yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_and_its_command_names_it(path):
    cfg = TrainConfig.from_dict(load_config_file(path), source=str(path))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# negbatch train --config examples/configs/" + path.name), first
    assert cfg.dataset


@pytest.mark.parametrize("path", [p for p in CONFIGS if "digits" in p.name], ids=lambda p: p.name)
def test_image_example_runs(path, tmp_path, capsys):
    command = shlex.split(path.read_text().splitlines()[0].lstrip("# "))[1:]
    command[command.index("--config") + 1] = str(path)
    command[command.index("--out") + 1] = str(tmp_path / "run")
    tiny = ["--n-train", "64", "--n-test", "32", "--batch-size", "16", "--epochs", "1", "--encoder-widths", "16",
            "--head-widths", "16,8", "--knn-k", "5"]
    assert main(command + tiny) == 0
    assert "linear accuracy" in capsys.readouterr().out
