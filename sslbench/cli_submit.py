"""``sslbench submit``: a run as one Slurm job, through submitit (as the DINO reference's
``run_with_submitit.py``), that requeues itself on preemption or time-out until the run ends.

The run folder is written here first (config.yaml, environment.json), so a typo is refused before the job
waits in a queue, and the job is a plain ``sslbench run ... --out RUN --resume``: the first attempt finds
nothing to resume and starts, a requeued one goes on from the newest checkpoints. Its nodes x tasks
processes form the process group torchrun would form (RANK, WORLD_SIZE, MASTER_ADDR from the scheduler's
variables). On submitit's warning signal (SIGUSR2: ``--signal-delay-s`` before the time limit, or
``scancel --signal=USR2``) the step in progress finishes, a checkpoint is written, and the job requeues
itself (``scontrol requeue``; the local executor starts it again). SIGTERM (a cancel, or a preemption
Slurm requeues itself) checkpoints and stops as it does for ``sslbench run``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslbench.base.errors import SSLBenchError
from sslbench.cli import _resolve_run_config, _restart, main, resume_command, resumed_argv
from sslbench.cli_parser import JOB_OPTIONS
from sslbench.training.environment import record_scheduler_job
from sslbench.training.experiment import check_run_request
from sslbench.training.interrupt import also_stop_on
from sslbench.training.run_folder import prepare_out_dir

JOBS_FOLDER = "jobs"  # RUN/jobs/: submitit's pickles and the job's logs, <job id>_<rank>_log.out / .err
HOW_TO_RUN = {"slurm_additional_parameters", "slurm_srun_args"}  # script options, not what was asked
MEM_GB_PER_GPU = 40  # the DINO reference's run_with_submitit.py: mem_gb=40 * num_gpus_per_node


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise SSLBenchError(
            "sslbench submit needs submitit, which is not installed: pip install 'sslbench[submit]'"
        ) from None
    return submitit


def minutes(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SSLBenchError(f"--time {text}: expected minutes or [D-]HH:MM[:SS], e.g. 2800 or 1-22:40:00")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    else:  # minutes, or MM:SS
        seconds = int(first) * 60 + int(second or 0)
    if seconds <= 0:
        raise SSLBenchError(f"--time {text}: a job needs some time; give minutes or [D-]HH:MM[:SS]")
    return math.ceil(seconds / 60)


def job_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit's parameters for the flags: one task per GPU (at least one), the DINO reference's
    defaults for memory, and ``--requeue`` so the job may requeue itself on any cluster."""
    for flag, value in (("--nodes", args.nodes), ("--tasks-per-node", args.tasks_per_node)):
        if value is not None and value < 1:
            raise SSLBenchError(f"{flag} {value}: a job needs at least 1")
    if args.gpus_per_node < 0:
        raise SSLBenchError(f"--gpus-per-node {args.gpus_per_node}: give 0 or more")
    if args.cluster == "local" and args.nodes > 1:
        raise SSLBenchError(f"--nodes {args.nodes}: --cluster local runs on this machine, one node")
    parameters = {
        "name": args.job_name or "sslbench",
        "timeout_min": minutes(args.time),
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node or max(args.gpus_per_node, 1),
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb if args.mem_gb is not None else MEM_GB_PER_GPU * max(args.gpus_per_node, 1),
    }
    slurm = {"partition": args.partition, "account": args.account, "qos": args.qos}
    slurm |= {"constraint": args.constraint, "signal_delay_s": args.signal_delay_s}
    slurm["additional_parameters"] = {"requeue": True}
    # srun: a rank that dies ends the job (no torchrun agent does it here), and every task gets its CPUs
    # (Slurm 22.05-23.02's srun does not inherit --cpus-per-task from the batch script).
    slurm["srun_args"] = ["--kill-on-bad-exit=1", f"--cpus-per-task={args.cpus_per_task}"]
    return parameters | {f"slurm_{key}": value for key, value in slurm.items() if value is not None}


def check_cluster(cluster: str) -> None:
    """submitit, and for Slurm its commands, must be here: checked before anything is written."""
    _submitit()
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SSLBenchError(
            "no Slurm on this machine (sbatch and srun are not on PATH): submit from the cluster's login "
            "node, or use --cluster local to run the job here under submitit's local executor"
        )


def make_executor(cluster: str, parameters: dict[str, Any], folder: Path) -> Any:
    """submitit's executor for ``--cluster`` writing into ``folder``, its parameters set."""
    executor = _submitit().AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    return executor


def job_argv(argv: Sequence[str]) -> list[str]:
    """``submit``'s arguments without the job's own flags: what ``sslbench run`` takes."""
    with_value = {name for name, spec in JOB_OPTIONS if spec.get("action") != "store_true"}
    names = {name for name, _ in JOB_OPTIONS}
    kept: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        name = token.split("=", 1)[0]
        if name not in names:
            kept.append(token)
        elif name in with_value and "=" not in token:
            next(tokens, None)
    return kept


def warning_signal() -> int:
    """The signal submitit warns with before a time limit or a preemption (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another)."""
    return int(signal.Signals["SIG" + _submitit().JobEnvironment.USR_SIG])


def join_process_group(env: Any) -> None:
    """Set what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR: the job's first
    host, MASTER_PORT: drawn from the job id) from the scheduler's variables, when the job has more than
    one process. Every GPU of the node stays visible: ``init_distributed`` takes LOCAL_RANK's."""
    if env.num_tasks > 1:
        processes = _submitit().helpers.TorchDistributedEnvironment()
        processes.export(set_cuda_visible_devices=False, overwrite=True)


@dataclass(frozen=True)
class SubmittedRun:
    """What the job runs (submitit pickles it): one attempt at ``sslbench run ... --out RUN --resume``.

    submitit calls ``checkpoint`` when it requeues the job; the next attempt resumes the same folder.
    """

    run_argv: tuple[str, ...]
    out_dir: str
    submission: dict[str, Any] = field(default_factory=dict)
    resume_hint: str = ""  # the command that resumes the run by hand if the job stops for good
    attempt: int = 1

    def __call__(self) -> int:
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        env = _submitit().JobEnvironment()
        requeue = SignalHandler(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
        join_process_group(env)
        record_scheduler_job(self.job_record(env))
        sys.argv = ["sslbench", *self.run_argv]  # what environment.json records as the command
        warning = warning_signal()
        with also_stop_on(warning):
            status = main(list(self.run_argv), resume_hint=self.resume_hint, requeue_signal=warning)
        if status == 128 + warning:
            print(
                f"sslbench: requeueing job {env.job_id}: attempt {self.attempt + 1} resumes {self.out_dir}",
                file=sys.stderr,
                flush=True,
            )
            requeue.checkpoint_and_try_requeue(warning)  # the global rank 0 requeues, and exits
            return status
        if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # cancelled, or a requeue by Slurm:
            sys.exit(status)  # no result file, as submitit's own requeue leaves none
        if status != 0:
            raise RuntimeError(f"sslbench run ended with status {status}; its log: {env.paths.stderr}")
        return status

    def checkpoint(self) -> Any:
        """What submitit queues again on a requeue: the next attempt, which resumes the same folder."""
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(dataclasses.replace(self, attempt=self.attempt + 1))

    def job_record(self, env: Any) -> dict[str, Any]:
        """The job in environment.json: its id, this attempt, the scheduler's log files of rank 0."""
        return {
            "scheduler": env.cluster,
            "job_id": env.job_id,
            "attempt": self.attempt,
            "stdout": str(env.paths.stdout),
            "stderr": str(env.paths.stderr),
            "hostnames": list(env.hostnames),
            "nodes": env.num_nodes,
            "tasks": env.num_tasks,
            **self.submission,
        }


def command_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Check the request, write the run folder, queue the job; with ``--wait``, its table."""
    config = _resolve_run_config(args)
    restart = _restart(args)
    check_run_request(config, restart)
    parameters = job_parameters(args)
    asked = {key.removeprefix("slurm_"): value for key, value in parameters.items() if key not in HOW_TO_RUN}
    submission = {"submitted_command": ["sslbench", *argv], "asked": asked}
    environment = {"command": ["sslbench", *argv], "job": {"scheduler": args.cluster, **submission}}
    check_cluster(args.cluster)
    out_dir, lock = prepare_out_dir(config, restart, environment)
    lock.release()
    out_dir = out_dir.resolve()
    executor = make_executor(args.cluster, parameters, out_dir / JOBS_FOLDER)
    run_flags = job_argv(argv)[1:]
    quiet = [] if "--no-progress" in run_flags else ["--no-progress"]  # a progress bar garbles a log file
    run_argv = resumed_argv(["run", *run_flags, *quiet], out_dir)
    hint = resume_command(argv, out_dir)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal: said below
            job = executor.submit(SubmittedRun(tuple(run_argv), str(out_dir), submission, hint))
    except Exception as error:  # sbatch refused (a partition, an account): its own words
        said = str(error)
        raise SSLBenchError(
            f"the job was not queued: {' '.join(said.split()) or type(error).__name__}. The run folder "
            f"{out_dir} is written; fix the flag and submit again with --out {out_dir} --resume"
        ) from None
    print(f"submitted job {job.job_id} ({args.cluster}) for run folder {out_dir}")
    print(f"logs: {job.paths.stdout}\n      {job.paths.stderr}")
    print(f"the job runs: {shlex.join(['sslbench', *run_argv])}")
    if not args.wait:
        return 0
    return _wait(job, out_dir)


def _wait(job: Any, out_dir: Path) -> int:
    from sslbench.reporting.tables import format_table_text, load_results

    try:
        statuses = job.results()  # one per process; the helper ranks' are 0
    except Exception as error:  # the job failed: submitit's message ends with its traceback
        last = str(error).strip().splitlines()[-1:] or ["no message"]
        raise SSLBenchError(f"job {job.job_id} failed ({last[0]}); its log: {job.paths.stderr}") from None
    status = next((status for status in statuses if status), 0)
    print(format_table_text(load_results([out_dir])))
    print(f"\njob {job.job_id} ended; wrote {out_dir}")
    return int(status)
