"""A run as a whole: checks that happen before anything trains."""

from __future__ import annotations

import pytest

from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig, resolve_config
from sslbench.method.registry import list_methods, load_plugin_file
from sslbench.training.experiment import resolve_device, run_benchmark


def test_a_folder_that_holds_a_run_is_not_written_into(tmp_path):
    (tmp_path / "dino-resnet18").mkdir()
    (tmp_path / "dino-resnet18" / "eval.json").write_text("{}")
    config = RunConfig(methods=["random"], archs=["resnet18"], out=str(tmp_path))
    with pytest.raises(SSLBenchError, match="already holds a run"):
        run_benchmark(config, show_progress=False)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"train": {"batch_size": 0}}, "'train.batch_size' must be positive"),
        ({"train": {"log_every": 0}}, "'train.log_every' must be positive"),
        ({"eval": {"knn_k": [10]}}, "'eval.knn_headline_k' \\(20\\) must be one of eval.knn_k"),
        ({"eval": {"linear_val_fraction": 1.0}}, "'eval.linear_val_fraction' must be in"),
        ({"eval": {"linear_lrs": []}}, "'eval.linear_lrs' must be a non-empty list"),
        ({"method_options": {"dino": {}}}, "unknown config key 'method_options'"),
    ],
)
def test_values_a_type_cannot_rule_out_are_rejected_up_front(layer, message):
    with pytest.raises(SSLBenchError, match=message):
        resolve_config([layer], list(list_methods()))


def test_a_plugin_that_is_not_a_python_file_gets_a_message(tmp_path):
    notes = tmp_path / "method.txt"
    notes.write_text("not python")
    with pytest.raises(SSLBenchError, match="not a Python file"):
        load_plugin_file(notes)


def test_cpu_device_resolves_and_a_missing_gpu_is_explained():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(SSLBenchError, match="unknown device"):
        resolve_device("tpu9")


def test_a_variant_may_not_change_the_data_or_the_pairs(tmp_path):
    from sslbench.training.experiment import Variant

    config = RunConfig(methods=["random"], archs=["resnet18"], out=str(tmp_path / "run"))
    with pytest.raises(SSLBenchError, match="variant 'other_data' changes dataset"):
        run_benchmark(config, show_progress=False, variants=[Variant("other_data", {"dataset": "cifar10"})])
    assert not (tmp_path / "run").exists()


def test_every_run_records_its_environment(tmp_path):
    import json

    out = tmp_path / "run"
    config = RunConfig(methods=["random"], archs=["resnet18"], out=str(out), seed=3)
    config.eval.train_per_class, config.eval.test_per_class, config.eval.linear_epochs = 2, 1, 1
    run_benchmark(config, show_progress=False)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["seed"] == 3 and environment["device"] == "cpu"
    assert environment["packages"]["sslbench"] == "0.1.0" and environment["packages"]["torch"]
    assert "git_commit" in environment and environment["python"]
