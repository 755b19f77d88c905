from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_chain_and_overrides(tmp_path):
    _write(tmp_path, "base.yaml", "model:\n  num_queries: 10\ntrain:\n  lr: 0.1\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain:\n  lr: 0.2\n")
    cfg = load_config(child, ["model.transformer.enc_layers=2"])
    assert cfg.model.num_queries == 10 and cfg.train.lr == 0.2
    assert cfg.model.transformer.enc_layers == 2
    assert cfg.model.transformer.dec_layers == 6  # typed default untouched


def test_unknown_key_names_key_and_file(tmp_path):
    _write(tmp_path, "base.yaml", "model:\n  num_querys: 10\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*model\.num_querys"):
        load_config(child)


def test_wrong_type_names_key_and_file(tmp_path):
    path = _write(tmp_path, "bad.yaml", "train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochs"):
        load_config(path)


def test_bad_override_names_it():
    with pytest.raises(ConfigError, match=r"--opts train\.lr=fast.*train\.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_missing_base_and_cycle(tmp_path):
    path = _write(tmp_path, "a.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(path)
    _write(tmp_path, "x.yaml", "_base_: y.yaml\n")
    _write(tmp_path, "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(None, ["model.num_queries=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)
