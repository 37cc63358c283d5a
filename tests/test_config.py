"""Settings are read from LIVETRAIN_* once, typed by their field, with errors that name
the variable; nothing is written back to the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from livetrain.config import PluginConfig, TrainableFamilies


def test_defaults_without_environment():
    assert PluginConfig.from_env({}) == PluginConfig()


def test_every_kind_of_field_is_parsed():
    config = PluginConfig.from_env(
        {
            "LIVETRAIN_SYNC_DELAY_S": "2.5",
            "LIVETRAIN_TRAINER_MAX_RESTARTS": "7",
            "LIVETRAIN_STATE_DIR": "~/state",
            "LIVETRAIN_READOUT": "/srv/readout",
            "LIVETRAIN_READOUT_LAYERS": "5, 2,5",
            "LIVETRAIN_TRAIN_NORMS": "yes",
            "LIVETRAIN_TRAIN_LINEAR": "0",
            "LIVETRAIN_READOUT_ROOTS": f"/srv/a{os.pathsep}~/b",
            "LIVETRAIN_CPU_KERNELS": "plain",
        }
    )
    assert config.cpu_kernels == "plain"
    assert config.readout_roots == (Path("/srv/a"), Path.home() / "b")
    assert config.sync_delay_s == 2.5 and config.trainer_max_restarts == 7
    assert config.state_dir == Path.home() / "state"
    assert config.readout == Path("/srv/readout") and config.readout_layers == (2, 5)
    assert config.train == TrainableFamilies(linear=False, norms=True)
    assert config.readout_enabled


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LIVETRAIN_TRAIN_NORMS", "maybe"),
        ("LIVETRAIN_MAX_BODY_BYTES", "1e9x"),
        ("LIVETRAIN_CPU_KERNELS", "packed"),
    ],
)
def test_bad_values_name_the_variable(key, value):
    with pytest.raises(ValueError, match=key):
        PluginConfig.from_env({key: value})


def test_reading_leaves_the_environment_alone(monkeypatch):
    monkeypatch.setenv("LIVETRAIN_READOUT_LAYERS", "1")
    before = dict(os.environ)
    PluginConfig.from_env()
    assert dict(os.environ) == before


def test_readout_roots_default_to_the_launch_folder_built_ins_and_trainer_output(tmp_path):
    from livetrain.api.readout_routes import readout_roots
    from livetrain.tools.default_model import DEFAULT_READOUT

    roots = readout_roots(PluginConfig(readout=tmp_path / "mine" / "readout"))
    assert set(roots) == {
        (tmp_path / "mine").resolve(),
        DEFAULT_READOUT.parent.resolve(),
        Path("readout_out").resolve(),
    }
    assert readout_roots(PluginConfig(readout_roots=(tmp_path,))) == (tmp_path.resolve(),)
