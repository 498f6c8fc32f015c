"""The `fbmem` command itself: light start-up, --version, --help, --device, the exit-status rule
and the package metadata (tests of single commands live beside their modules' tests)."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import torch

from scanner import exits
from scanner.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "PIL", "pandas", "pyarrow", "matplotlib", "diffusers", "ray")


def subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_help_of_every_command_imports_nothing_heavy():
    # What made `fbmem --help` take 2.5-7 s: torch imported at start-up. Each command's --help
    # is parsed in a fresh interpreter, which then lists the heavy modules it has loaded.
    probe = f"""
import sys
from scanner.cli import main
for argv in [["--help"], *[[name, "--help"] for name in {subcommands()!r}]]:
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"
    assert "Exit status: 0 all inputs processed, 3 finished with error rows" in done.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"fbmem {version('fbmem-scanner')}"


def test_every_option_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"fbmem {name} {action.option_strings[0]} has no help"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_clear_line(tmp_path, capsys):
    code = main(["compare", "a.png", "b.png", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fbmem compare: error: --device cuda: not available here")
    assert err.rstrip().endswith("this machine has: cpu")


def test_a_misspelt_device_is_one_clear_line(capsys):
    code = main(["cluster", "memorized", "--out", "x.parquet", "--device", "cdua"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--device 'cdua' is not a device name; this machine has: cpu" in err


def _raising(exc):
    def command():
        raise exc

    return command


@pytest.mark.parametrize(
    ("command", "status", "line"),
    [
        (lambda: exits.OK, 0, None),
        (lambda: exits.finished(2), 3, None),
        (_raising(ValueError("bad input")), 2, "prog: error: bad input"),
        (_raising(FileNotFoundError(errno.ENOENT, "No such file", "x")), 2, "prog: error: "),
        (_raising(OSError(errno.EROFS, "Read-only file system", "out")), 1, "prog: aborted: "),
        (_raising(KeyboardInterrupt()), 1, "prog: interrupted"),
    ],
)
def test_exit_status_rule(command, status, line, capsys):
    assert exits.run("prog", command) == status
    err = capsys.readouterr().err
    assert (err == "") if line is None else (err.startswith(line) and err.count("\n") == 1)


def test_a_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError):
        exits.run("prog", _raising(RuntimeError("a bug")))


def _labels(path: Path, labels: list[str]) -> Path:
    pd.DataFrame(
        {"prompt_id": range(len(labels)), "gen_idx": 0, "method": "m", "label": labels}
    ).to_csv(path, index=False)
    return path


def test_mitigation_score_reads_as_text_on_a_terminal_and_json_in_a_pipe(
    tmp_path, capsys, monkeypatch
):
    pre = _labels(tmp_path / "pre.csv", ["VM", "FM", "NM"])
    post = _labels(tmp_path / "post.csv", ["NM", "FM", "NM"])
    assert main(["mitigation-score", str(pre), str(post)]) == 0
    piped = json.loads(capsys.readouterr().out)
    assert piped["score"] == pytest.approx(2.0 / 3)  # VM -> NM scores +2, the rest 0
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["mitigation-score", str(pre), str(post)]) == 0
    text = capsys.readouterr().out
    assert "{" not in text and "mitigation score (the paper's Table 2): 0.667 over 3" in text


def _build(hook: str, out: Path) -> subprocess.CompletedProcess:
    """Run one of setuptools' PEP 517 hooks on the project as pip does, warnings all shown."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )


def test_package_metadata_has_an_spdx_licence_and_builds_without_deprecations(tmp_path):
    # setuptools >= 77 warns on every install about a licence given as a TOML table.
    done = _build("prepare_metadata_for_build_wheel", tmp_path)
    assert "Deprecat" not in done.stderr, done.stderr[-2000:]
    metadata = (tmp_path / done.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata


def test_the_editable_install_of_scripts_setup_sh_prints_no_notice(tmp_path):
    # Without an explicit package-dir setuptools installs through an import hook and pip
    # shows its "Editable installation" notice (InformationOnly) on every run of setup.sh.
    done = _build("build_editable", tmp_path)
    assert not re.search(r"\w+Warning|InformationOnly", done.stderr), done.stderr[-2000:]
    assert (tmp_path / done.stdout.split()[-1]).is_file()


@pytest.mark.parametrize("job", ["full_scan.py", "mitigate.py"])
def test_jobs_exit_by_the_same_rule(job, tmp_path):
    # A usage error: one line naming the job and the fault, status 2, no traceback and no
    # output folder. (Error rows exit 3: tests/test_full_scan.py's tiny-sd runs.)
    argv = ["--model", "m", "--reference", "r", "--top-k", "-1", "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"{job}: error: n_per_prompt and shard_size must be >= 1 and top_k >= 0\n"
    assert not (tmp_path / "o").exists()


def test_a_scan_with_no_reference_store_is_refused_before_any_work(tmp_path):
    argv = ["--model", "m", "--reference", "gone", "--prompt-limit", "2", "--out", "o"]
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "full_scan.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        f"full_scan.py: error: {tmp_path / 'gone'}: not a reference store (no manifest.json); "
        "build one with `fbmem build-reference`\n"
    )
    assert not (tmp_path / "o").exists()  # no scan directory, no Ray started


def test_cluster_with_prompts_left_out_exits_3(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red chair\n\nmountain bike\na red sofa\n")
    argv = ["cluster", str(tmp_path / "prompts.txt"), "--k", "2", "--out", str(tmp_path / "c.pq")]
    assert main([*argv, "--method", "authors", "--model", str(tiny_sd_dir)]) == 3
    assert "1 left out for errors" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "c.pq")) == 3


def test_mitigation_score_of_a_missing_table_is_a_usage_error(tmp_path, capsys):
    pre = _labels(tmp_path / "pre.csv", ["VM"])
    assert main(["mitigation-score", str(pre), str(tmp_path / "gone.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fbmem mitigation-score: error: ") and "gone.csv" in err
    assert err.count("\n") == 1


# scripts/browser.sh: chromium for the browser test, or a clear note that the test is skipped.


def _fake_path(tmp_path, uid: int, apt_status: int | None) -> dict[str, str]:
    """A PATH with no chromium, an `id` that says `uid`, and (if given) an apt-get that
    exits with `apt_status`, so the script's three outcomes run on any machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"id": f"echo {uid}"}
    if apt_status is not None:
        tools["apt-get"] = f'echo "apt-get $*" >> {tmp_path / "apt.log"}; exit {apt_status}'
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


@pytest.mark.parametrize(
    ("uid", "apt_status", "note"),
    [
        (1000, None, "(tests/test_report.py::test_report_in_headless_chromium) will be skipped"),
        (0, 0, None),
        (0, 100, "apt-get could not install chromium chromium-driver; the browser test"),
    ],
)
def test_browser_script_installs_chromium_or_says_the_test_is_skipped(
    tmp_path, uid, apt_status, note
):
    done = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "browser.sh")],
        env=_fake_path(tmp_path, uid, apt_status),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0  # never fails: the rest of the suite runs either way
    if note is None:
        assert "note" not in done.stdout
    else:
        assert note in done.stdout
    if apt_status is not None:
        calls = (tmp_path / "apt.log").read_text().splitlines()
        assert calls[0] == "apt-get update -qq"
        assert ("apt-get install -y -qq chromium chromium-driver" in calls) == (apt_status == 0)


def test_the_readme_test_command_runs_the_browser_script():
    steps = (REPO / "scripts" / "test.sh").read_text()
    assert steps.index("scripts/browser.sh") < steps.index("pytest")
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
