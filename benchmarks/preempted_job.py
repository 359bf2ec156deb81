"""The main job as a preempted Slurm job, on this machine: ``sslbench submit --cluster local`` (submitit's
local executor), sent submitit's SIGUSR2 while the first pair trains, requeued, and compared with a run
of the same command left alone (by default the committed ``results/examples/quick-vit_s16``).

    python benchmarks/preempted_job.py [--out /tmp/preempted] [--reference results/examples/quick-vit_s16]

Prints where the job stopped, the requeue's gap, the wall time, and whether every pair's numbers and
losses equal the reference's. Writes only the run folder it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

COMMAND = ["submit", "--methods", "dino,byol", "--arch", "vit_s16", "--no-progress"]
JOB = ["--cluster", "local", "--gpus-per-node", "0", "--wait"]
STAMP = re.compile(r"submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\) - (.*)")


def _trained_steps(pair_dir: Path) -> int:
    metrics = pair_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"kind": "train"' in line for line in metrics.read_text().splitlines())


def _requeue_gap(log: str) -> float:
    """Seconds from submitit's requeue to the next attempt's start, from the job's own log."""
    events = [(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f"), what) for t, what in STAMP.findall(log)]
    requeued = next(t for t, what in events if what.startswith("Requeued job"))
    restarted = next(t for t, what in events if t >= requeued and what.startswith("Starting with"))
    return (restarted - requeued).total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/preempted-main-job")
    parser.add_argument("--reference", default="results/examples/quick-vit_s16")
    parser.add_argument("--after-steps", type=int, default=3, help="signal once DINO logged this many steps")
    args = parser.parse_args()
    out, reference = Path(args.out).resolve(), Path(args.reference)
    started = time.perf_counter()
    with (Path(f"{out}.log")).open("w") as sink:
        submit = subprocess.Popen(
            [sys.executable, "-m", "sslbench", *COMMAND, *JOB, "--out", str(out), "--force"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    while _trained_steps(out / "dino-vit_s16") < args.after_steps and submit.poll() is None:
        time.sleep(0.2)
    job_process = json.loads((out / ".lock").read_text())["pid"]
    os.kill(job_process, signal.SIGUSR2)
    signalled = time.perf_counter() - started
    submit.wait()
    total = time.perf_counter() - started
    job = json.loads((out / "environment.json").read_text())["job"]
    log = Path(job["stdout"]).read_text() + Path(job["stderr"]).read_text()
    stopped = re.search(r"dino-vit_s16 stopped after (\d+) completed iteration", log)
    print(f"submit exit status {submit.returncode}; SIGUSR2 after {signalled:.0f} s; stopped after "
          f"{stopped[1] if stopped else '?'} iterations; requeue gap {_requeue_gap(log):.1f} s; "
          f"attempt {job['attempt']}; total {total:.0f} s")  # fmt: skip
    same = True
    for pair in ("dino-vit_s16", "byol-vit_s16"):
        runs = [json.loads((run / pair / "eval.json").read_text()) for run in (reference, out)]
        losses = [
            [json.loads(line).get("loss") for line in (run / pair / "metrics.jsonl").read_text().splitlines()]
            for run in (reference, out)
        ]
        equal = runs[0]["knn"] == runs[1]["knn"] and runs[0]["linear"] == runs[1]["linear"]
        equal = equal and losses[0] == losses[1]
        same = same and equal
        print(
            f"{pair}: linear {runs[1]['linear']['top1']} {runs[1]['linear'].get('ci95')}, k-NN 20 "
            f"{runs[1]['knn']['20']}; resumed_at {runs[1]['train'].get('resumed_at')}; "
            f"{'equal to' if equal else 'DIFFERENT from'} {reference}"
        )
    return 0 if same and submit.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
