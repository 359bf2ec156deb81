"""What a run says about itself: one line per pair with an estimate for the whole run, and, when it
stops on a signal, the exact command that resumes it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from test_bad_input import QUICK, _run

from sslbench.cli import build_parser, resume_command
from sslbench.training.experiment import RunProgress

PROGRESS = [arg for arg in QUICK if arg != "--no-progress"]  # QUICK with the per-pair lines shown


# --- one line per pair --------------------------------------------------------------------------------------


def _pair_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sslbench: [")]


def test_a_run_of_two_pairs_says_how_far_it_is(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Then a resume of the finished run keeps both pairs and says so, pair by pair."""
    out = tmp_path / "out"
    code, stderr = _run(capsys, *PROGRESS, "--arch", "resnet18,vit_tiny16", "--out", str(out))
    assert code == 0 and "Traceback" not in stderr
    first, second = _pair_lines(stderr)
    assert first == "sslbench: [1/2] random-resnet18: estimate after the first pair"
    assert re.fullmatch(
        r"sslbench: \[2/2\] random-vit_tiny16: about \d+ s left for the run \(1 pair\(s\) to go\)", second
    ), second
    code, stderr = _run(capsys, *PROGRESS, "--arch", "resnet18,vit_tiny16", "--out", str(out), "--resume")
    assert code == 0 and "Traceback" not in stderr
    assert _pair_lines(stderr) == [
        "sslbench: [1/2] random-resnet18: finished before, kept",
        "sslbench: [2/2] random-vit_tiny16: finished before, kept",
    ]


def test_no_progress_prints_no_pair_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stderr = _run(capsys, *QUICK, "--out", str(tmp_path / "out"))
    assert code == 0 and "Traceback" not in stderr
    assert _pair_lines(stderr) == [] and "sslbench: [" not in stderr


def test_run_progress_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    """The mean pair time so far times the pairs left, the starting one included; minutes from 120 s.
    Two pairs of 60 s and 120 s, pair 3 of 5 starting: 90 s x 3 = 270 s = 4.5 min, printed by
    ``{:.0f}`` (round half to even) as 4 min."""
    progress = RunProgress(5, show=True)
    progress.start("a")
    progress.finish(60.0)
    progress.start("b")
    progress.finish(120.0)
    progress.start("c")
    progress.finish(30.0)  # mean 70 s
    progress.start("d")  # 70 s x 2 = 140 s
    progress.finish(10.0)  # mean 55 s
    progress.start("e")  # 55 s x 1
    assert capsys.readouterr().err.splitlines() == [
        "sslbench: [1/5] a: estimate after the first pair",
        "sslbench: [2/5] b: about 4 min left for the run (4 pair(s) to go)",  # 60 s x 4
        "sslbench: [3/5] c: about 4 min left for the run (3 pair(s) to go)",
        "sslbench: [4/5] d: about 2 min left for the run (2 pair(s) to go)",
        "sslbench: [5/5] e: about 55 s left for the run (1 pair(s) to go)",
    ]


def test_run_progress_skip_and_silence(capsys: pytest.CaptureFixture[str]) -> None:
    progress = RunProgress(3, show=True)
    progress.skip("random-resnet18")
    progress.start("dino-resnet18")  # nothing timed yet: a kept pair says nothing about the time
    progress.finish(10.0)
    progress.start("byol-resnet18")
    assert capsys.readouterr().err.splitlines() == [
        "sslbench: [1/3] random-resnet18: finished before, kept",
        "sslbench: [2/3] dino-resnet18: estimate after the first pair",
        "sslbench: [3/3] byol-resnet18: about 10 s left for the run (1 pair(s) to go)",
    ]
    quiet = RunProgress(2, show=False)
    quiet.skip("a")
    quiet.start("b")
    assert capsys.readouterr().err == ""


# --- the command that resumes an interrupted run ------------------------------------------------------------


def test_resume_command_replaces_out_and_force() -> None:
    argv = ["run", "--methods", "dino", "--out", "old", "--force", "--set", "a=b c"]
    command = resume_command(argv, Path("results/x"))
    assert command == "sslbench run --methods dino --set 'a=b c' --out results/x --resume"
    assert shlex.split(command) == [
        "sslbench", "run", "--methods", "dino", "--set", "a=b c", "--out", "results/x", "--resume"
    ]  # fmt: skip
    args = build_parser().parse_args(shlex.split(command)[1:])  # a command the parser takes as it is
    assert (args.out, args.resume, args.force, args.assignments) == ("results/x", True, False, ["a=b c"])


def test_resume_command_drops_out_equals_and_an_earlier_resume() -> None:
    argv = ["run", "--out=old", "--resume", "--arch", "resnet18", "--resume"]
    assert resume_command(argv, Path("results/x")) == "sslbench run --arch resnet18 --out results/x --resume"
    spaced = resume_command(["ablate", "dino", "--vary", "dino.teacher_temp=0.04,0.07"], Path("my runs/a"))
    assert spaced == "sslbench ablate dino --vary dino.teacher_temp=0.04,0.07 --out 'my runs/a' --resume"


def test_abbreviated_options_are_refused_so_a_resume_command_means_what_was_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse would take --forc for --force; the printed resume command drops --force only by its name."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["run", "--methods", "random", "--forc", "--out", "old"])
    assert stopped.value.code == 2 and "unrecognized arguments: --forc" in capsys.readouterr().err
    command = resume_command(["run", "--methods", "random", "--force", "--out", "old"], Path("results/x"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.resume, args.force, args.out) == (True, False, "results/x")


def test_the_resume_command_under_torchrun_relaunches_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started by torchrun must not be resumed in one process with the whole global batch."""
    from sslbench.cli import launcher

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launcher() == ["sslbench"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    prefix = launcher()
    assert prefix == ["torchrun", "--nproc_per_node=8", "-m", "sslbench"]
    command = resume_command(["run", "--methods", "dino"], Path("results/x"), prefix)
    assert command == "torchrun --nproc_per_node=8 -m sslbench run --methods dino --out results/x --resume"


# --- pairs a method does not train ------------------------------------------------------------------------

VIT_ONLY_PLUGIN = """
from sslbench import Method, register_method


@register_method("vit_only_random")
class VitOnlyRandom(Method):
    trainable = False
    families = ("vit",)
"""


@pytest.mark.usefixtures("isolated_registry")
def test_a_pair_a_method_does_not_train_is_in_the_table_as_such(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plugin = tmp_path / "vit_only.py"
    plugin.write_text(VIT_ONLY_PLUGIN, encoding="utf-8")
    out = tmp_path / "out"
    args = [a for a in PROGRESS if a not in ("random", "resnet18")]
    methods = [
        "--plugin",
        str(plugin),
        "--methods",
        "vit_only_random,random",
        "--arch",
        "resnet18,vit_tiny16",
    ]
    code, stderr = _run(
        capsys, *[a for a in args if a not in ("--methods", "--arch")], *methods, "--out", str(out)
    )
    assert code == 0 and "Traceback" not in stderr
    skipped = "vit_only_random-resnet18: not applicable: vit_only_random trains ViTs only, not resnet18"
    assert f"sslbench: [1/4] {skipped}" in stderr
    table = (out / "table.md").read_text(encoding="utf-8")
    row = next(line for line in table.splitlines() if line.startswith("| vit_only_random"))
    assert row.count("n/a") == 2 and "failed" not in row
    assert "- knn_k: 20\n" in table  # a pair that did not run has no protocol to vary
    # Nothing of the run applies: one line, before any folder is made
    only = [a for a in args if a not in ("--methods", "--arch")]  # the plugin stays registered
    code, stderr = _run(
        capsys, *only, "--methods", "vit_only_random", "--arch", "resnet18", "--out", str(tmp_path / "o2")
    )
    assert code == 2 and stderr.strip() == (
        "sslbench: error: no pair of this run applies: vit_only_random trains ViTs only, not resnet18"
    )
    assert not (tmp_path / "o2").exists()
