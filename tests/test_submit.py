"""``sslbench submit``: the run folder is written before the job is queued, Slurm is asked for what the
flags say, the job's processes form torchrun's process group, and a job signalled mid-run (submitit's
SIGUSR2, as before a time limit or a preemption) checkpoints, requeues itself, and ends with the numbers
of the same run left alone. Slurm itself is not here: its commands are stand-ins that keep the script,
and the requeue runs under submitit's local executor, the one submitit tests itself with."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cli_session import run_cli
from test_resume import PAIR, RUN, _env, _newest_iteration

submitit = pytest.importorskip("submitit")

from sslbench.base.errors import SSLBenchError  # noqa: E402 - after the skip
from sslbench.cli_submit import _wait, join_process_group, minutes  # noqa: E402

LOCAL_JOB = ["--cluster=local", "--gpus-per-node=0"]


def test_a_signalled_job_checkpoints_requeues_and_ends_with_the_uninterrupted_numbers(
    tmp_path, uninterrupted_dino_run
):
    out, log = tmp_path / "run", tmp_path / "submit.log"
    with log.open("w") as sink:  # a file, not a pipe: the job's processes inherit it and outlive nothing
        submit = subprocess.Popen(
            [*RUN[:3], "submit", *RUN[4:], *LOCAL_JOB, "--wait", f"--out={out}"],
            stdout=sink, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while _newest_iteration(out) < 1 and submit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert submit.poll() is None, log.read_text()[-3000:]
        job_process = json.loads((out / ".lock").read_text())["pid"]  # the run's lock names its process
        assert job_process != submit.pid
        os.kill(job_process, signal.SIGUSR2)  # as `scancel --signal=USR2`, or Slurm before the time limit
        submit.wait(timeout=300)
    finally:
        if submit.poll() is None:
            submit.kill()
    said = log.read_text()
    assert submit.returncode == 0, said[-3000:]
    job_id = re.search(r"submitted job (\d+) \(local\) for run folder", said)[1]
    assert f"job {job_id} ended; wrote {out}" in said and "| dino" in said  # --wait prints the table

    job_log = (out / "jobs" / f"{job_id}_0_log.err").read_text()
    assert "sslbench: SIGUSR2: finishing this step and saving a checkpoint" in job_log
    stopped_at = int(re.search(rf"{PAIR} stopped after (\d+) completed iteration", job_log)[1])
    assert "the job requeues itself and goes on from the newest checkpoints" in job_log
    assert f"sslbench: requeueing job {job_id}: attempt 2 resumes {out}" in job_log
    assert "Traceback" not in job_log

    runs = (uninterrupted_dino_run, out)
    whole, resumed = (json.loads((run / PAIR / "eval.json").read_text()) for run in runs)
    assert resumed["status"] == "ok" and resumed["train"]["resumed_at"] == stopped_at >= 1
    assert resumed["knn"] == whole["knn"] and resumed["linear"] == whole["linear"]
    losses = [
        [json.loads(line).get("loss") for line in (run / PAIR / "metrics.jsonl").read_text().splitlines()]
        for run in runs
    ]
    assert losses[1] == losses[0]

    job = json.loads((out / "environment.json").read_text())["job"]
    assert (job["scheduler"], job["job_id"], job["attempt"]) == ("local", job_id, 2)
    assert job["stderr"] == str(out / "jobs" / f"{job_id}_0_log.err") and Path(job["stdout"]).is_file()
    assert job["asked"]["tasks_per_node"] == 1 and job["submitted_command"][:2] == ["sslbench", "submit"]


def _stand_in_slurm(
    folder: Path, monkeypatch: pytest.MonkeyPatch, answer: str = 'echo "Submitted batch job 4242"'
) -> Path:
    """``srun`` and an ``sbatch`` that keeps the script it is given and answers as Slurm does."""
    folder.mkdir()
    kept = folder / "job.sbatch"
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {shlex.quote(str(kept))}\n{answer}\n')
    for command in ("srun", "sbatch"):
        (folder / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return kept


def test_submit_writes_the_run_folder_first_and_asks_slurm_for_the_flags(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = shlex.quote(str(out / "config.yaml"))
    first = f'test -f {config} || {{ echo "no run folder yet" >&2; exit 3; }}'  # queued only after it
    kept = _stand_in_slurm(tmp_path / "bin", monkeypatch, answer=f'{first}; echo "Submitted batch job 4242"')
    run_flags = ["--methods=dino", "--arch=resnet18", "--epochs=1", "--set=train.lr=0.001"]
    job_flags = ["--nodes=2", "--gpus-per-node", "8", "--partition=learnlab", "--time=1-00:00:00",
                 "--account", "ssl", "--qos=high", "--constraint=volta32gb", "--job-name=dino-r18",
                 "--cpus-per-task=12", "--mem-gb=480", "--signal-delay-s=300"]  # fmt: skip
    code, said, err = run_cli(["submit", *run_flags, *job_flags, f"--out={out}"])
    assert code == 0, err
    jobs = out / "jobs"
    assert f"submitted job 4242 (slurm) for run folder {out}\nlogs: {jobs}/4242_0_log.out\n" in said

    script = kept.read_text()
    asked = ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=480GB",
             "--partition=learnlab", "--time=1440", "--account=ssl", "--qos=high", "--constraint=volta32gb",
             "--job-name=dino-r18", "--signal=USR2@300", "--requeue",
             f"--output={jobs}/%j_0_log.out"]  # fmt: skip
    for option in asked:
        assert f"#SBATCH {option}\n" in script, option
    srun = f"srun --unbuffered --output {jobs}/%j_%t_log.out --error {jobs}/%j_%t_log.err"
    assert f"{srun} --kill-on-bad-exit=1 --cpus-per-task=12 " in script  # one process per task

    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.001
    environment = json.loads((out / "environment.json").read_text())
    assert environment["job"]["asked"]["nodes"] == 2 and environment["job"]["scheduler"] == "slurm"
    job = submitit.core.utils.DelayedSubmission.load(jobs / "4242_submitted.pkl").function
    expected = ["run", *run_flags, "--no-progress", "--out", str(out), "--resume"]  # the job's flags gone
    assert list(job.run_argv) == expected
    by_hand = ["sslbench", "submit", *run_flags, *job_flags, "--out", str(out), "--resume"]
    assert job.resume_hint == shlex.join(by_hand)
    requeued = job.checkpoint().function  # what a requeue queues: the next attempt at the same run
    assert requeued.attempt == 2 and requeued.run_argv == job.run_argv


class _EndedJob:
    """What submitit's job object answers once every task has ended."""

    job_id = "4242"
    paths = type("Paths", (), {"stderr": Path("jobs/4242_0_log.err")})

    def __init__(self, statuses: list[int] | Exception) -> None:
        self.statuses = statuses

    def results(self) -> list[int]:
        if isinstance(self.statuses, Exception):
            raise self.statuses
        return self.statuses


def test_wait_prints_the_table_and_the_status_of_every_process(capsys):
    committed = Path(__file__).resolve().parents[1] / "results" / "examples" / "quick-vit_s16"
    assert _wait(_EndedJob([0, 0, 0, 0]), committed) == 0  # a job of 4 processes
    said = capsys.readouterr().out
    assert "| dino " in said and f"job 4242 ended; wrote {committed}" in said
    assert _wait(_EndedJob([0, 1]), committed) == 1  # the main rank's pair failed: not hidden
    with pytest.raises(SSLBenchError, match=r"job 4242 failed \(RuntimeError: boom\); its log: jobs/4242_0"):
        _wait(_EndedJob(RuntimeError("Traceback ...\nRuntimeError: boom")), committed)


def test_a_job_slurm_refuses_says_what_slurm_said_and_how_to_submit_again(tmp_path, monkeypatch):
    refusal = "sbatch: error: Batch job submission failed: Invalid partition name specified"
    _stand_in_slurm(tmp_path / "bin", monkeypatch, answer=f'echo "{refusal}" >&2; exit 1')
    out = tmp_path / "run"
    code, said, err = run_cli(["submit", "--arch=resnet18", "--partition=nope", f"--out={out}"])
    assert code == 2 and said == "" and err.count("\n") == 1, err
    assert refusal in err and f"submit again with --out {out} --resume" in err
    assert (out / "config.yaml").is_file()  # written, so the fixed command resumes it


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "no Slurm on this machine (sbatch and srun are not on PATH)"),
        (["--cluster=local", "--nodes=2"], "--nodes 2: --cluster local runs on this machine, one node"),
        (["--cluster=local", "--time=soon"], "--time soon: expected minutes or [D-]HH:MM[:SS]"),
        (["--cluster=local", "--methods=dinoo"], "unknown method 'dinoo'"),
        (["--cluster=local", "--gpus-per-node=-1"], "--gpus-per-node -1: give 0 or more"),
    ],
)
def test_a_submission_that_cannot_run_is_refused_in_one_line_before_anything_is_written(
    tmp_path, monkeypatch, flags, message
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    out = tmp_path / "run"
    code, said, err = run_cli(["submit", "--arch=resnet18", *flags, f"--out={out}"])
    assert code == 2 and said == "" and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_without_submitit_submit_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)  # as if not installed
    code, _, err = run_cli(["submit", "--arch=resnet18", "--cluster=local", f"--out={tmp_path / 'run'}"])
    assert code == 2 and "pip install 'sslbench[submit]'" in err
    assert not (tmp_path / "run").exists()


def test_the_jobs_processes_form_the_process_group_torchrun_would(monkeypatch):
    """Task 9 of a 2-node x 8-GPU job: torchrun's variables, the same master for every task."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # undone after the test, as is what the job sets
    monkeypatch.delenv("MASTER_PORT")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NODEID": "1",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[007-008]"}  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    join_process_group(submitit.JobEnvironment())
    torchrun = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert torchrun == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert os.environ["MASTER_ADDR"] == "gpu007"
    port = os.environ["MASTER_PORT"]
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("MASTER_PORT")
    join_process_group(submitit.JobEnvironment())
    assert os.environ["MASTER_PORT"] == port and os.environ["RANK"] == "0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2800", 2800), ("90:30", 91), ("1:00:00", 60), ("1-00", 1440), ("1-12:30", 2190), ("2-00:00:01", 2881)],
)
def test_time_limits_read_as_slurm_reads_them(text, expected):
    assert minutes(text) == expected
