"""Run a simulation app with ``flwr run`` on a local SuperLink that this script owns.

    python simulations/run.py adult_married --supernodes 5 --run-config "num-server-rounds=8"

``flwr run <app> local`` starts a SuperLink that keeps running after the run (Flower's
design, so later runs start fast). This wrapper starts its own SuperLink in simulation
mode instead, runs the app with log streaming, and stops the SuperLink and everything
it spawned, by process group, when the run ends or fails. If a SuperLink is already
serving the local ports it is used and left running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTROL_PORT = 39093
HEALTH_URL = "http://127.0.0.1:39091/health"
QUIET_ENV = {
    # The local SuperLink would otherwise reinstall the app's dependencies (torch!) with uv.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def superlink_healthy() -> bool:
    try:
        with urllib.request.urlopen(HEALTH_URL, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start_superlink(env: dict, log_file: Path) -> subprocess.Popen:
    """A simulation-mode SuperLink in its own process group, ready to take runs."""
    command = [
        shutil.which("flower-superlink") or "flower-superlink",
        "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{CONTROL_PORT}",
        "--host", "127.0.0.1", "--port", "39091",
        "--log-file", str(log_file),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        if superlink_healthy():
            return process
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"flower-superlink did not become ready in 120 s; see {log_file}")


def stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and its children (simulation, Ray workers) by process group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a fedlowrank simulation app end to end.")
    parser.add_argument("app", help="app folder under simulations/ (e.g. adult_married) or a path")
    parser.add_argument("--supernodes", type=int, default=5, help="number of simulated sites")
    parser.add_argument("--run-config", default="", help="overrides, e.g. \"num-server-rounds=3 strategy='fedit'\"")
    args = parser.parse_args(argv)
    app = Path(args.app) if Path(args.app).exists() else HERE / args.app
    if not (app / "pyproject.toml").exists():
        raise SystemExit(f"no Flower app at {app} (expected a pyproject.toml there)")
    env = {**os.environ, **QUIET_ENV}
    env.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedlowrank-flwr-"))
    owned = None
    if not superlink_healthy():
        owned = start_superlink(env, Path(env["FLWR_HOME"]) / "superlink.log")
        print(f"started SuperLink (pid {owned.pid})", flush=True)
    command = [
        shutil.which("flwr") or "flwr", "run", str(app), "local", "--stream",
        "--federation-config", f"num-supernodes={args.supernodes} client-resources-num-cpus=1",
    ]
    if args.run_config:
        command += ["--run-config", args.run_config]
    try:
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        if owned is not None:
            stop(owned)
            print(f"stopped SuperLink (pid {owned.pid})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
