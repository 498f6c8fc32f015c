"""`ray job submit` of the demo to a real Ray head started here, as docs/cluster.md tells users.

The head runs on 127.0.0.1 with its own ports, temp dir and token file, in a process
session this test owns; it is stopped by ending exactly that session's processes, never by
`ray stop` (which ends every Ray process of the machine, other people's included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.test_full_scan import REPO, end_marked, marked_pids, table

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600
# Never upload the virtual environment (GBs), git history or earlier outputs with the job.
RUNTIME_ENV = {"excludes": [".venv/", ".git/", "scans/", "out/", "build/"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_status(url: str, token: str | None = None) -> int | None:
    """HTTP status of a dashboard GET, None while nothing answers."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token auth: yields its dashboard URL, the environment a
    client needs (token, venv on PATH) and its temp dir."""
    marker = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts sockets in it
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "FBMEM_TEST_RUN": marker,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain: stop at once
    }
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        command,
        env=env,
        stdout=(tmp_path / "head.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: ended below by its id
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while dashboard_status(f"{url}/api/version") is None:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the Ray dashboard did not come up"
            time.sleep(1)
        yield url, env, Path(temp_dir)
    finally:
        stray = stop_head(head, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not stray, f"processes of this Ray instance outlived its head: {stray}"


def stop_head(head: subprocess.Popen, marker: str) -> list[int]:
    """SIGTERM the head's process group (`ray start --block` then stops what it started),
    wait for every process of this instance to go, SIGKILL what is left; returns those."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    deadline = time.monotonic() + 30
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(1)
    return end_marked(marker)


@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_runs_the_demo_on_a_token_protected_head(ray_head, tmp_path):
    url, env, temp_dir = ray_head
    # Token auth is on: the job API turns away a client without the token.
    assert dashboard_status(f"{url}/api/jobs/") == 401
    assert (
        dashboard_status(f"{url}/api/jobs/", token=Path(env["RAY_AUTH_TOKEN_PATH"]).read_text())
        == 200
    )

    config = tmp_path / "demo.yaml"
    # The report is tested on its own; the weightless segmenter keeps the job short.
    config.write_text("report: false\ntop_k: 2\nsegmenter: classical\n")
    out = tmp_path / "scan"
    submit = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(RUNTIME_ENV),
        "--",
        "python",
        "jobs/full_scan.py",
        "--demo",
        "replication",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        submit, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {
        "prompts": 10,
        "generations": 32,
        "matches": 64,
        "labels": 32,
        "errors": 0,
    }
    labels = table(out, "labels")
    verbatim = labels[labels["gen_idx"] == 0]
    assert list(verbatim["label"]) == ["VM"] * 10

    # What was uploaded: the code, without the excluded folders.
    packages = [
        p for p in temp_dir.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()
    ]
    assert packages, "no working-dir package found in the head's session"
    for package in packages:
        assert (package / "jobs" / "full_scan.py").is_file()
        assert (package / "scanner" / "plan.py").is_file()
        assert not (package / ".venv").exists()
        assert not (package / ".git").exists()


def test_cluster_yaml_is_valid_and_keeps_the_head_private():
    """cluster.yaml passes the launcher's own preparation and schema (what `ray up` runs
    first), binds the dashboard and job server to the head's private address, and keeps
    token authentication on on every node."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == len(raw["provider"]["worker_ips"])

    head_ip = raw["provider"]["head_ip"]
    head = " ".join(raw["head_start_ray_commands"])
    assert f"--dashboard-host={head_ip}" in head
    assert "0.0.0.0" not in head
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
    assert "~/.ray/auth_token" in raw["file_mounts"]  # the same token on every node
    assert "**/.venv" in raw["rsync_exclude"]
