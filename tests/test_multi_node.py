"""Two torchrun launchers, as on two nodes (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on
127.0.0.1, gloo), train what one process trains: the ranks agree on the run folder the main rank chose,
only the global rank 0 writes, and the pair ends where the one-process run ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from test_distributed import RUN_ARGS, _env, _initial_weights

ARGS = [*[a for a in RUN_ARGS if not a.startswith("--methods=")], "--methods=dino", "--preset=quick"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_launchers_train_what_one_process_trains(tmp_path: Path):
    single = subprocess.run(
        [sys.executable, "-m", "sslbench", *ARGS, f"--out={tmp_path / 'one'}"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    node = tmp_path / "nodes"
    node.mkdir()
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=sslbench-test"]  # fmt: skip
    # No --out: the main rank picks results/<date>-quick and every rank must learn it from that rank.
    nodes = [
        subprocess.Popen(
            [*launch, "-m", "sslbench", *ARGS],
            cwd=node,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in nodes]
    for process, (_, stderr) in zip(nodes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    (run,) = (node / "results").iterdir()  # one folder, made by the main rank only
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["dino-resnet18"]
    one = torch.load(tmp_path / "one" / "dino-resnet18" / "backbone.pt", weights_only=True)
    two = torch.load(run / "dino-resnet18" / "backbone.pt", weights_only=True)
    floats = [key for key, value in one.items() if value.is_floating_point() and "running_" not in key]
    start = _initial_weights("resnet18")
    moved = torch.cat([(one[k] - start[k]).flatten() for k in floats]).norm()
    apart = torch.cat([(two[k] - one[k]).flatten() for k in floats]).norm()
    assert moved > 0.1 and apart < 1e-3 * moved, f"the nodes ended {apart / moved:.2e} of the way apart"
    record = json.loads((run / "dino-resnet18" / "eval.json").read_text())
    assert record["protocol"]["processes"] == 2
