"""RunConfig: defaults, presets, the layer order, --set parsing, and the messages a mistake gets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sslbench.base.errors import SSLBenchError
from sslbench.cli import main
from sslbench.config import (
    PRESETS,
    EvalConfig,
    RunConfig,
    TrainConfig,
    config_hash,
    config_to_dict,
    load_preset,
    load_yaml,
    parse_set,
    resolve_config,
)
from sslbench.method.registry import get_method, list_methods
from sslbench.training import experiment
from sslbench.training.runner import plan_pair

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def method_names() -> list[str]:
    return list(list_methods())


def _resolve(method_names: list[str], *assignments: str) -> RunConfig:
    return resolve_config([parse_set(a) for a in assignments], method_names)


def _error(method_names: list[str], *assignments: str) -> str:
    with pytest.raises(SSLBenchError) as caught:
        _resolve(method_names, *assignments)
    return str(caught.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and presets -------------------------------------------------------------------------------


def test_defaults(method_names: list[str]) -> None:
    config = resolve_config([], method_names)
    assert config == RunConfig()
    assert config.methods == ["dino", "byol"]
    assert config.archs == ["vit_s16"]
    assert (config.dataset, config.preset, config.recipe, config.seed, config.device) == (
        "embedded", "quick", "shared", 0, "auto")  # fmt: skip
    assert config.image_size is None and config.out is None and config.method_options == {}
    train = config.train
    assert (train.epochs, train.batch_size, train.optimizer, train.lr, train.warmup_epochs) == (
        100, 256, "adamw", 5e-4, 10)  # fmt: skip
    assert (train.weight_decay, train.weight_decay_end, train.ema_momentum) == (0.04, 0.4, 0.996)
    assert config.eval.knn_k == [10, 20, 100, 200]
    assert (config.eval.knn_headline_k, config.eval.knn_temperature) == (20, 0.07)
    assert config.eval.linear_lrs == [0.01, 0.1, 1.0]
    # Mutable defaults are not shared between instances.
    assert RunConfig().eval.knn_k is not RunConfig().eval.knn_k


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid(name: str, method_names: list[str]) -> None:
    preset = load_preset(name)
    config = resolve_config([preset, {"preset": name}], method_names)
    assert config.preset == name
    for method, options in config.method_options.items():  # method sections match their dataclass
        options_cls = get_method(method).Config
        assert dataclasses.is_dataclass(options_cls)
        assert set(options) <= {f.name for f in dataclasses.fields(options_cls)}
        plan_pair(get_method(method), "resnet18", config, CPU)


def test_unknown_preset_suggests_the_close_one() -> None:
    with pytest.raises(SSLBenchError, match=r"unknown preset 'quik' \(did you mean 'quick'\?\)"):
        load_preset("quik")


# --- the layer order, through the command line ----------------------------------------------------------


class _Resolved(Exception):
    def __init__(self, config: RunConfig) -> None:
        super().__init__("resolved")
        self.config = config


def _config_from_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> RunConfig:
    """What ``sslbench run ARGS`` would run, stopped before anything is trained."""

    def stop(config: RunConfig, show_progress: bool = True, **_: object) -> None:
        raise _Resolved(config)

    monkeypatch.setattr(experiment, "run_benchmark", stop)
    with pytest.raises(_Resolved) as caught:
        main(["run", *args])
    return caught.value.config


def test_layer_order_preset_config_flags_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config_file = _write(tmp_path / "run.yaml", yaml.safe_dump({
        "seed": 3,
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.001},
        "eval": {"linear_epochs": 20},
        "dino": {"out_dim": 128, "teacher_temp": 0.05},
    }))  # fmt: skip
    config = _config_from_cli(
        monkeypatch, "--preset", "quick", "--config", str(config_file), "--epochs", "7", "--batch-size", "8",
        "--seed", "4", "--set", "train.epochs=9", "--set", "dino.out_dim=64",
        "--set", "train.min_lr=0.1", "--set", "train.min_lr=0.2",
    )  # fmt: skip
    assert config.train.warmup_epochs == 0.5  # preset over the default (10)
    assert config.eval.train_per_class == 100  # preset, untouched by later layers
    assert config.eval.linear_epochs == 20  # config file over the preset (50)
    assert config.train.lr == 0.001  # config file over the default
    assert config.train.batch_size == 8  # flag over the config file (16) and the preset (32)
    assert config.seed == 4  # flag over the config file
    assert config.train.epochs == 9  # --set over the flag (7), the config file (5) and the preset (2)
    assert config.train.min_lr == 0.2  # the last --set wins
    # Method sections merge key by key across the layers.
    assert config.method_options["dino"] == {"out_dim": 64, "local_crops_number": 2, "teacher_temp": 0.05}
    assert config.preset == "quick"


def test_preset_flag_selects_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config_from_cli(monkeypatch, "--preset", "cifar10", "--methods", "byol", "--arch", "resnet18")
    assert (config.preset, config.dataset, config.train.epochs) == ("cifar10", "cifar10", 200)
    assert (config.methods, config.archs) == (["byol"], ["resnet18"])


def test_resolve_config_layer_order(method_names: list[str]) -> None:
    layers = [{"train": {"epochs": 1, "lr": 0.5}}, {"train": {"epochs": 2}}, {"train": {"epochs": 3}}]
    config = resolve_config(layers, method_names)
    assert config.train.epochs == 3
    assert config.train.lr == 0.5


# --- --set parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3", 3), ("0.5", 0.5), ("1.5e-3", 0.0015), ("[1,2]", [1, 2]), ("[0.1, 1.0]", [0.1, 1.0]),
        ("null", None), ("true", True), ("false", False), ("adamw", "adamw"), ("'3'", "3"), ("", None),
    ],
)  # fmt: skip
def test_parse_set_types(raw: str, expected: Any) -> None:
    value = parse_set(f"train.x={raw}")["train"]["x"]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("raw", ["1e-3", "5e-4", "1E-6"])
def test_parse_set_reads_exponent_floats(raw: str, method_names: list[str]) -> None:
    assert parse_set(f"train.lr={raw}") == {"train": {"lr": float(raw)}}
    assert _resolve(method_names, f"train.lr={raw}").train.lr == float(raw)


def test_config_file_reads_exponent_floats(tmp_path: Path, method_names: list[str]) -> None:
    config_file = _write(tmp_path / "lr.yaml", "train:\n  lr: 1e-3\n")
    assert resolve_config([load_yaml(config_file)], method_names).train.lr == 1e-3


def test_parse_set_nesting_and_equals_in_value() -> None:
    assert parse_set("seed=7") == {"seed": 7}
    assert parse_set("dino.teacher_temp=0.07") == {"dino": {"teacher_temp": 0.07}}
    assert parse_set("a.b.c=x=y") == {"a": {"b": {"c": "x=y"}}}
    assert parse_set(" train.epochs =3") == {"train": {"epochs": 3}}


def test_parse_set_needs_an_equals_sign() -> None:
    with pytest.raises(SSLBenchError, match="--set expects key=value"):
        parse_set("train.epochs")


# --- mistakes and their messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "key", "suggestion"),
    [
        ("train.epoch=3", "train.epoch", "train.epochs"),
        ("seeed=1", "seeed", "seed"),
        ("eval.knn_temprature=0.1", "eval.knn_temprature", "eval.knn_temperature"),
        ("train.batchsize=8", "train.batchsize", "train.batch_size"),
        ("dnio.out_dim=64", "dnio", "dino"),  # a misspelt method section
    ],
)
def test_unknown_key_suggests_the_right_one(assignment: str, key: str, suggestion: str,
                                            method_names: list[str]) -> None:  # fmt: skip
    message = _error(method_names, assignment)
    assert f"unknown config key '{key}'; did you mean '{suggestion}'?" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys(method_names: list[str]) -> None:
    message = _error(method_names, "zzzzzz=1")
    assert "did you mean" not in message
    assert "seed" in message and "train" in message and "dino" in message
    nested = _error(method_names, "train.zzzzzz=1")
    assert "train.epochs" in nested and "train.lr" in nested


@pytest.mark.parametrize("assignment", ["train.zzzzzz=1", "train.wd=0.1", "train.seed=1"])
def test_a_far_off_nested_key_gets_no_misleading_suggestion(assignment: str, method_names: list[str]) -> None:
    assert "did you mean 'train.lr'" not in _error(method_names, assignment)


@pytest.mark.parametrize(
    ("assignment", "key", "type_name"),
    [
        ("train.epochs=abc", "train.epochs", "int"),
        ("train.epochs=1.5", "train.epochs", "int"),
        ("train.epochs=true", "train.epochs", "int"),
        ("train.lr=fast", "train.lr", "float"),
        ("eval.knn_k=[10,x]", "eval.knn_k", "list[int]"),
        ("eval.linear=[1]", "eval.linear", "bool | str"),
        ("seed=[1]", "seed", "int"),
    ],
)
def test_wrong_type_names_the_key_and_type(assignment: str, key: str, type_name: str,
                                           method_names: list[str]) -> None:  # fmt: skip
    message = _error(method_names, assignment)
    assert f"config key '{key}' must be {type_name}, got" in message


def test_a_section_must_be_a_mapping(method_names: list[str]) -> None:
    assert "config section 'train' must be a mapping" in _error(method_names, "train=3")
    assert "config section 'dino'" in _error(method_names, "dino=3")


def test_float_accepts_int_and_optional_accepts_none(method_names: list[str]) -> None:
    config = _resolve(method_names, "train.lr=1", "train.warmup_epochs=0", "train.train_per_class=null",
                      "train.train_per_class=5", "eval.train_per_class=null")  # fmt: skip
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.warmup_epochs == 0.0 and isinstance(config.train.warmup_epochs, float)
    assert config.train.train_per_class == 5
    assert config.eval.train_per_class is None


# --- method sections -------------------------------------------------------------------------------------


def test_method_sections_are_kept_as_method_options(tmp_path: Path, method_names: list[str]) -> None:
    config_file = _write(tmp_path / "m.yaml", "dino:\n  out_dim: 64\n  global_crops_scale: [0.3, 1.0]\n"
                                              "byol:\n  proj_hidden_dim: 64\n")  # fmt: skip
    config = resolve_config([load_yaml(config_file)], method_names)
    assert config.method_options == {"dino": {"out_dim": 64, "global_crops_scale": [0.3, 1.0]},
                                     "byol": {"proj_hidden_dim": 64}}  # fmt: skip
    plan = plan_pair(get_method("dino"), "vit_tiny16", config, CPU)
    assert plan.method_options.out_dim == 64
    assert plan.method_options.global_crops_scale == (0.3, 1.0)  # YAML list -> the tuple field
    assert plan.method_options.hidden_dim == 2048  # the method's default
    assert config_to_dict(config)["dino"] == {"out_dim": 64, "global_crops_scale": [0.3, 1.0]}


def test_a_typo_in_a_method_section_is_caught_when_the_pair_is_planned(method_names: list[str]) -> None:
    config = _resolve(method_names, "dino.out_dimm=64")
    assert config.method_options == {"dino": {"out_dimm": 64}}
    expected = r"unknown config key 'dino\.out_dimm'; did you mean 'dino\.out_dim'\?"
    with pytest.raises(SSLBenchError, match=expected):
        plan_pair(get_method("dino"), "resnet18", config, CPU)
    wrong_type = _resolve(method_names, "byol.proj_dim=wide")
    with pytest.raises(SSLBenchError, match=r"config key 'byol\.proj_dim' must be int"):
        plan_pair(get_method("byol"), "resnet18", wrong_type, CPU)


def test_paper_recipe_is_applied_at_planning(method_names: list[str]) -> None:
    shared = _resolve(method_names)
    paper = _resolve(method_names, "recipe=paper")
    assert plan_pair(get_method("byol"), "resnet18", shared, CPU).train.optimizer == "adamw"
    planned = plan_pair(get_method("byol"), "resnet18", paper, CPU)
    assert (planned.train.optimizer, planned.train.lr) == ("lars", 0.45)  # 100 epochs: the 100-epoch values
    assert planned.recipe.startswith("paper (byol, resnet, 100-epoch values)")
    assert plan_pair(get_method("byol"), "vit_tiny16", paper, CPU).recipe == "shared"  # no ViT recipe


# --- YAML files -------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "seed: 1\ntrain:\n  epochs: 3\n bad: 2\n")
    with pytest.raises(SSLBenchError) as caught:
        load_yaml(bad)
    message = str(caught.value)
    assert message.startswith(f"YAML syntax error in {bad}, line 4:")


def test_yaml_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SSLBenchError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(SSLBenchError, match="must hold a mapping"):
        load_yaml(_write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert load_yaml(_write(tmp_path / "empty.yaml", "")) == {}


def test_written_config_reads_back_as_the_same_config(tmp_path: Path, method_names: list[str]) -> None:
    config = _resolve(method_names, "methods=[dino,simclr]", "archs=[resnet18]", "train.epochs=3",
                      "dino.out_dim=64", "simclr.temperature=0.2", "eval.knn_k=[5,20]")  # fmt: skip
    written = _write(tmp_path / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    assert resolve_config([load_yaml(written)], method_names) == config


# --- config_hash ------------------------------------------------------------------------------------------


def test_config_hash_is_stable_and_sensitive() -> None:
    train, evaluation = dataclasses.asdict(TrainConfig()), dataclasses.asdict(EvalConfig())
    payload = {"train": train, "eval": evaluation, "seed": 0}
    reordered = dict(reversed(list(payload.items())))
    digest = config_hash(payload)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert config_hash(payload) == digest == config_hash(reordered)
    # Fixed across processes and versions: no salted hash() anywhere.
    assert config_hash({"seed": 0, "train": {"epochs": 1}}) == "3cf9b14fd72d"
    changed = [
        {**payload, "seed": 1},
        {**payload, "train": dataclasses.asdict(TrainConfig(lr=1e-3))},
        {**payload, "eval": dataclasses.asdict(EvalConfig(knn_k=[20]))},
        {**payload, "extra": None},
    ]
    digests = {config_hash(p) for p in changed}
    assert digest not in digests and len(digests) == len(changed)


def test_methods_all_is_every_registered_method() -> None:
    names = list(list_methods())
    assert resolve_config([{"methods": ["all"]}], names).methods == names
    assert resolve_config([{"methods": ["dino", "byol"]}], names).methods == ["dino", "byol"]
