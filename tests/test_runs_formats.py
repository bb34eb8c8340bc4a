"""Every run and checkpoint format an older tdr wrote still loads (fixtures in tests/fixtures, see its
README), or fails with one line naming its schema; the shared run machinery (tdr.runs)."""

from __future__ import annotations

import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tdr.cli import app
from tdr.guided.aggregation import AggregationConfig
from tdr.guided.backbones import build_backbone
from tdr.guided.config import TrainConfig, train_config
from tdr.guided.evaluate import load_run
from tdr.guided.train import train
from tdr.pipeline.checkpoint import load_checkpoint
from tdr.runs.checkpoint import SchemaError, load, rng_state, save, set_rng_state
from tdr.runs.config import ConfigError, check_resume, from_dict, merge, to_dict

FIXTURES = Path(__file__).parent / "fixtures"
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_tiny_store) -> str:
    base = tmp_path_factory.mktemp("store")
    return make_tiny_store(base / "data", str(base / "s.zarr"), n_train=2, n_test=1)


def test_schema2_run_loads_with_its_aggregation_nested():
    model, cfg = load_run(FIXTURES / "run-schema2" / "last.pt")
    assert cfg["aggregation"]["search"] == "global" and cfg["aggregation"]["match_features"] == "image"
    assert cfg["aggregation"]["fuse"] == "enc+dec" and cfg["auto_search"] is False
    assert not {"search", "match", "transfer", "fuse"} & set(cfg)
    assert model.agg.config.search == "global" and model.agg.config.transfer == "bilinear"
    assert model.agg.config.mutual == model.agg.config.mutual_fill == ()  # trained before the mutual test


def test_schema1_run_loads_through_both_migrations():
    model, cfg = load_run(FIXTURES / "run-schema1.pt")
    assert cfg["aggregation"]["search"] == "masa" and model.agg.config.match_features == "encoder"
    assert model.agg.config.transfer == "patch"


def test_future_schema_is_one_line_naming_it(store, tmp_path):
    ckpt = load(FIXTURES / "run-schema2" / "last.pt")
    save(tmp_path / "future.pt", {**ckpt, "schema": 9})
    with pytest.raises(SchemaError, match="schema 9") as info:
        load_run(tmp_path / "future.pt")
    assert "\n" not in str(info.value)
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "future.pt"), "--store", store])
    assert res.exit_code == 1 and "schema 9" in res.output and "Traceback" not in res.output


def test_eval_resume_and_init_accept_a_schema2_run(store, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(FIXTURES / "run-schema2" / "last.pt"), "--store", store])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-schema2", run)
    config = train_config({"resume": True, "out": str(run), "store": store})
    assert config.backbone == "nafnet-test" and config.patch == 32 and config.aggregation.search == "global"
    result = train(config)  # the saved settings pass the resume check; its 2 iterations are done
    assert result.start_step == 2 and result.step == 2
    with pytest.raises(Exception, match="resume: 'iters' is 3"):
        train(train_config({"resume": True, "out": str(run), "store": store, "iters": 3}))
    init = train(TrainConfig(backbone="nafnet-test", store=store, out=str(tmp_path / "init"), iters=1, patch=32,
                             batch_size=1, val_every=0, init=str(FIXTURES / "run-schema2" / "last.pt")))
    assert init.step == 1


def test_textual_checkpoints_as_written_before_still_load():
    assert type(load_checkpoint(FIXTURES / "mapper" / "last.pt", "mapper")).__name__ == "Mapper"
    assert type(load_checkpoint(FIXTURES / "cleaner" / "last.pt", "cleaner")).__name__ == "Cleaner"
    rng = load(FIXTURES / "mapper" / "last.pt")["train"]["rng"]
    set_rng_state(rng)  # an old state without python/numpy generators restores what it has
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_train_accepts_a_model_built_in_python(store, tmp_path):
    torch.manual_seed(0)
    model = build_backbone("nafnet-test", aggregation=AggregationConfig(search="masa", transfer="patch"))
    result = train(TrainConfig(backbone="nafnet-test", store=store, out=str(tmp_path / "r"), iters=1, patch=32,
                               batch_size=1, val_every=0), model=model)
    loaded, cfg = load_run(result.checkpoint)
    assert cfg["aggregation"]["search"] == "masa" and loaded.agg.config.transfer == "patch"
    plain = build_backbone("nafnet-test", guided=False)
    with pytest.raises(ConfigError, match="model: a plain backbone"):
        train(TrainConfig(backbone="nafnet-test", store=store, out=str(tmp_path / "p"), iters=1, patch=32,
                          batch_size=1, val_every=0), model=plain)


# -- tdr.runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inner:
    width: int = 8
    scales: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class Outer:
    name: str = ""
    lr: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_config_nested_types_and_unknown_keys():
    cfg = from_dict(Outer, {"name": "a", "lr": 1, "inner": {"scales": [1, 2]}})
    assert cfg == Outer("a", 1.0, Inner(8, (1.0, 2.0))) and isinstance(cfg.lr, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="inner.wdth"):
        from_dict(Outer, {"inner": {"wdth": 3}})
    with pytest.raises(ConfigError, match="'inner.width' must be an integer"):
        from_dict(Outer, {"inner": {"width": 1.5}})
    assert merge({"inner": {"width": 1}, "name": "a"}, {"inner": {"scales": [2.0]}, "name": None}) == \
        {"inner": {"width": 1, "scales": [2.0]}, "name": "a"}
    with pytest.raises(Exception, match="resume: 'inner.width'"):
        check_resume(Outer(inner=Inner(width=1)), Outer(), frozenset())
    check_resume(Outer(name="x"), Outer(), frozenset({"name"}))


def test_train_toml_layers_and_auto_search(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nbackbone = "nafnet-test"\niters = 7\n[train.aggregation]\nsearch = "masa"\nradius = 2\n')
    config = train_config({"iters": 9, "aggregation": {"transfer": "patch"}}, config_file=toml)
    assert config.iters == 9 and config.aggregation.radius == 2 and config.aggregation.transfer == "patch"
    assert config.aggregation.search == "masa" and not config.auto_search
    assert train_config({"aggregation": {"search": "auto"}}, config_file=toml).auto_search
    toml.write_text('[train.aggregation]\nsearch = "nearest"\n')
    with pytest.raises(ConfigError, match="search must be one of"):
        train_config(config_file=toml)
    toml.write_text('[train.aggregation]\nmutual_fill = [0.3, 0.2]\n')
    with pytest.raises(ConfigError, match="mutual_fill must be"):
        train_config(config_file=toml)
    toml.write_text('[train.aggregation]\nmutual = []\n')
    assert train_config(config_file=toml).aggregation.mutual == ()
    assert train_config().aggregation.mutual == AggregationConfig().mutual != ()


def test_textual_commands_take_a_config_file(tmp_path):
    from tdr.pipeline.textual import merged_config

    toml = tmp_path / "m.toml"
    toml.write_text('[train]\ndata = ["demo"]\nsize = 64\nsteps = 3\n')
    config = merged_config({"out": str(tmp_path / "o"), "steps": 5}, config_file=toml)
    assert config.data == ("demo",) and config.size == 64 and config.steps == 5
    toml.write_text('steps = "many"\n')
    res = CliRunner().invoke(app, ["train-mapper", "--data", "demo", "--out", str(tmp_path / "o"),
                                   "--config", str(toml)])
    assert res.exit_code == 1 and "'steps' must be an integer" in res.output and "Traceback" not in res.output


def test_rng_state_round_trip_covers_python_numpy_torch(tmp_path):
    state = rng_state()
    save(tmp_path / "rng.pt", {"rng": state})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load(tmp_path / "rng.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="Cannot read checkpoint") as info:
        load(bad)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_resuming_a_folder_holding_another_kind_of_checkpoint_is_one_line(tmp_path):
    shutil.copy(FIXTURES / "mapper" / "last.pt", tmp_path / "last.pt")
    with pytest.raises(Exception, match="not a tdr training checkpoint") as info:
        train_config({"resume": True, "out": str(tmp_path)})
    assert "\n" not in str(info.value)
