"""Run a simulation app with ``flwr run`` on a local SuperLink that this script owns.

    python simulations/run.py adult-married --supernodes 5 --run-config "num-server-rounds=8"
    python simulations/run.py adult-married --deployment 3 [--secure]   # Deployment Engine, loopback

``flwr run <app> local`` starts a SuperLink that keeps running after the run (Flower's
design, so later runs start fast). This wrapper starts its own SuperLink in simulation
mode instead, runs the app with log streaming, and stops the SuperLink and everything
it spawned, by process group, when the run ends or fails. If a SuperLink is already
serving the local ports it is used and left running. The exit code is non-zero when the
run failed: ``flwr run --stream`` exits 0 even when the ServerApp raised, so the runner
asks the SuperLink for the run's final status (``flwr ls``). A run whose ServerApp has ended
but whose simulation still waits on a hung site is stopped ``--grace`` seconds later.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

from fedlowrank.results import TRACEBACK_LAST_LINE

# Apps ship in the repository's simulations/ folder (not in the wheel): found from a checkout.
HERE = Path(__file__).resolve().parents[2] / "simulations"
CONTROL_PORT = 39093
RUN_STARTED = re.compile(r"started run (\d+)")
HEALTH_URL = "http://127.0.0.1:39091/health"
QUIET_ENV = {
    # The local SuperLink would otherwise reinstall the app's dependencies (torch!) with uv.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Ray's own FutureWarning on every run (accelerator variables); nothing to act on here.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
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


RUN_FAILED = re.compile(r"RunFailed: (.+)$")
"""The ServerApp's :class:`fedlowrank.results.RunFailed` in the streamed log: the run's cause of failure."""


SERVER_FINISHED = re.compile(r"results written to (.+), final adapter to ")
"""The ServerApp's last line after a run that completed (:func:`fedlowrank.strategies.serverapp.serve`)."""

SERVER_GRACE_S = 60.0
"""How long the runner lets Flower wind down after the ServerApp's last line. Flower's simulation
waits for every ClientApp it started, so a site hung past its round would hold ``flwr run`` (and
the runner) for as long as it hangs; past this the run is stopped."""


class Stream:
    """``flwr run --stream``, echoed line by line; keeps the run ID and a failure's cause, and
    stops a run whose ServerApp is done but whose sites are not (:data:`SERVER_GRACE_S`)."""

    def __init__(self, grace_s: float = SERVER_GRACE_S, superlink: str = "local") -> None:
        self.failure: str | None = None
        self.superlink = superlink  # the SuperLink connection flwr's commands name (``local``, a deployment's)
        self.server_finished = False  # the ServerApp completed (its last line was seen)
        self.results: str | None = None  # the results file it wrote
        self.error: str | None = None  # the last exception line of a traceback in the log
        self.stopped_hung = False  # the runner stopped a run whose ServerApp had ended
        self.grace_s = grace_s

    def __call__(self, command: list[str], env: dict) -> tuple[int, int | None]:
        """Run it; its exit code and the run ID."""
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        run_id = None
        watchdog: threading.Timer | None = None
        assert process.stdout is not None
        plain = not sys.stdout.isatty()  # Flower colours its log lines always; a redirected log gets none
        try:
            for line in process.stdout:
                if FLOWER_NOISE.search(line) or self.stopped_hung:  # after a stop: flwr's lost-connection box
                    continue
                sys.stdout.write(ANSI.sub("", line) if plain else line)
                sys.stdout.flush()
                found = RUN_STARTED.search(line)
                if found and run_id is None:
                    run_id = int(found.group(1))
                clean = ANSI.sub("", line.rstrip())
                failed = RUN_FAILED.search(clean)
                if failed:
                    self.failure = failed.group(1)
                finished = SERVER_FINISHED.search(clean)
                if finished:
                    self.server_finished, self.results = True, finished.group(1)
                raised = TRACEBACK_LAST_LINE.match(clean.strip())  # e.g. RuntimeError: stop-after-round = 3: ...
                if raised:
                    self.error = f"{raised.group(1)}: {raised.group(2)}"
                if (failed or self.server_finished) and watchdog is None:
                    watchdog = threading.Timer(self.grace_s, self._stop_hung, (process, run_id))
                    watchdog.daemon = True
                    watchdog.start()
            code = process.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if process.poll() is None:  # interrupted: the log stream goes with us
                process.terminate()
        if self.stopped_hung and run_id is not None:  # here, not in the timer's thread: it must end before we do
            subprocess.run([shutil.which("flwr") or "flwr", "stop", str(run_id), self.superlink], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        return code, run_id

    def outcome(self, code: int, run_id: int | None, env: dict) -> int:
        """The run's exit code, printed with its status: ``flwr run --stream`` exits 0 even when the
        ServerApp raised, so the SuperLink is asked; a run stopped for a hung site is what its
        ServerApp made of it (its results are written)."""
        if self.stopped_hung:
            code = 0 if self.server_finished and not self.failure else 1
            print(f"run {run_id}: {'completed' if code == 0 else 'failed'} (a hung site was stopped after the ServerApp "
                  "ended)", flush=True)
        elif code == 0 and run_id is not None:
            status = run_status(run_id, env, self.superlink)
            print(f"run {run_id}: {status or 'status unknown'}", flush=True)
            if status is not None and "completed" not in status:
                code = 1
        return code

    def _stop_hung(self, process: subprocess.Popen, run_id: int | None) -> None:
        """The ServerApp ended ``grace_s`` ago and Flower still waits: a site hangs. Stop the run."""
        if process.poll() is not None:
            return
        self.stopped_hung = True
        print(f"the ServerApp ended {self.grace_s:g} s ago but Flower still waits for a site that hangs past its "
              f"round-timeout; stopping run {run_id}", flush=True)
        process.terminate()  # ends the log stream; the run itself is stopped once the stream is closed


ANSI = re.compile(r"\x1b\[[0-9;]*m")

FLOWER_NOISE = re.compile(
    r"Flower configuration not found\. Created default configuration"
    r"|default simulated SuperNodes changed from 10 to 2"
    r"|To change federation size, use the following command"
    r"|flwr federation simulation-config "
)
"""Flower lines that say nothing true of a run started here: the runner makes its own Flower home
and always passes the number of simulated SuperNodes."""


def run_status(run_id: int, env: dict, superlink: str = "local") -> str | None:
    """The run's final status as the SuperLink reports it (``flwr ls``), e.g. ``finished:completed``."""
    done = subprocess.run(
        [shutil.which("flwr") or "flwr", "ls", superlink, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )
    try:
        runs = json.loads(done.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


RUN_CONFIG_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
"""A ``key=value`` pair of ``--run-config``, quoted values kept whole (as ``flwr run`` reads them)."""


def missing_extras(app: Path, run_config: str) -> list[str]:
    """The fedlowrank extras this run needs and this environment lacks (the local ClientApps run here)."""
    from importlib.util import find_spec

    from fedlowrank.results import EXTRA_OF_MODULE

    settings = {**declared_config(app), **parse_run_config(run_config)}
    modules = []
    if float(settings.get("dp-noise-multiplier", 0) or 0) > 0:
        modules.append("opacus")
    if app.name == "fairlora-images":
        modules += ["monai", "einops", "torchvision"] + (["sklearn"] if settings.get("dataset") == "digits" else [])
    return sorted({EXTRA_OF_MODULE[m] for m in modules if find_spec(m) is None})


def with_default(run_config: str, key: str, value: str) -> str:
    """``run_config`` with ``key=value`` in front, unless it sets ``key`` itself."""
    return run_config if key in parse_run_config(run_config) else f"{key}={value} {run_config}".strip()


def parse_run_config(text: str) -> dict:
    """``"a=1 b='x y'"`` -> ``{"a": 1, "b": "x y"}``: ``key=value`` pairs, values as TOML."""
    return tomllib.loads("\n".join(f"{k} = {v}" for k, v in RUN_CONFIG_PAIR.findall(text)))


def declared_config(app: Path) -> dict:
    """The app's ``[tool.flwr.app.config]`` (its run-config keys and defaults)."""
    return tomllib.loads((app / "pyproject.toml").read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})


def check_run_config(app: Path, overrides: str) -> None:
    """Name any run-config key the app does not declare (Flower only says "Invalid run configuration.")."""
    if not overrides.strip():
        return
    declared = declared_config(app)
    try:
        given = parse_run_config(overrides)
    except Exception as err:  # noqa: BLE001
        raise SystemExit(f"--run-config {overrides!r} cannot be parsed: {err} (string values need quotes, e.g. "
                         "\"strategy='fedit' lr=0.01\")") from None
    unknown = sorted(set(given) - set(declared))
    if unknown:
        close = {k: difflib.get_close_matches(k, declared, n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {close[k][0]!r}?)" if close[k] else "") for k in unknown)
        raise SystemExit(f"unknown run-config keys for {app.name}: {hints}; declared keys are in {app / 'pyproject.toml'}")


def main(argv: list[str] | None = None) -> int:
    apps = sorted(p.name for p in HERE.iterdir() if (p / "pyproject.toml").exists()) if HERE.exists() else []
    parser = argparse.ArgumentParser(
        prog="fedlowrank run",
        description="Run a fedlowrank simulation app end to end: a local SuperLink, flwr run, the run's status, "
                    "and a non-zero exit with the cause when the run failed.",
        epilog=f"Apps: {', '.join(apps) or 'none found'} (under {HERE}). Each app's run-config keys, with their "
               "defaults and what they do, are in its pyproject.toml under [tool.flwr.app.config]; an unknown key "
               "is refused before the run starts.",
    )
    parser.add_argument("app", help=f"a Flower app folder, or the name of one under the repository's simulations/ ({', '.join(apps)})")
    parser.add_argument("--supernodes", type=int, default=5, help="number of simulated sites")
    parser.add_argument("--run-config", default="", help="overrides, e.g. \"num-server-rounds=3 strategy='fedit'\"")
    parser.add_argument("--deployment", type=int, metavar="N", default=0,
                        help="run on Flower's Deployment Engine instead: a SuperLink and N SuperNodes on loopback")
    parser.add_argument("--secure", action="store_true", help="with --deployment: TLS and SuperNode authentication")
    parser.add_argument("--grace", type=float, default=SERVER_GRACE_S, metavar="SECONDS",
                        help="after the ServerApp's last line, how long to let Flower finish before stopping a run that "
                             f"waits on a hung site (default {SERVER_GRACE_S:g})")
    parser.add_argument("--unregistered", type=int, default=0, help=argparse.SUPPRESS)  # tests: nodes with unknown keys
    args = parser.parse_args(argv)
    if args.secure and not args.deployment:
        parser.error("--secure needs --deployment N")
    app = Path(args.app) if Path(args.app).exists() else HERE / args.app
    if not app.exists() and (HERE / args.app.replace("_", "-")).exists():
        app = HERE / args.app.replace("_", "-")  # Flower app folders use hyphens (adult-married)
    if not (app / "pyproject.toml").exists():
        raise SystemExit(f"no Flower app at {app} (expected a pyproject.toml there)")
    check_run_config(app, args.run_config)
    if not args.deployment:  # a simulation's sites run in this environment: what they need is known now
        lacking = missing_extras(app, args.run_config)
        if lacking:
            extras = ",".join(lacking)
            raise SystemExit(f"{app.name} with these settings needs the [{extras}] extra{'s' if len(lacking) > 1 else ''}: "
                             f"pip install 'fedlowrank[{extras}]' (or, from the repository, pip install -e '.[{extras}]')")
    sites = args.deployment or args.supernodes
    declared = declared_config(app)
    if "num-sites" in declared:
        args.run_config = with_default(args.run_config, "num-sites", str(sites))  # the app checks it got them all
    if args.deployment and "central-evaluation" in declared:
        # The server's test rows are the app's demo data, not the sites': a deployment reports the federated figures.
        args.run_config = with_default(args.run_config, "central-evaluation", "false")
    env = {**os.environ, **QUIET_ENV}
    own_home = "FLWR_HOME" not in env
    env.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedlowrank-flwr-"))
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    stream = Stream(args.grace)
    code = 1
    # A SIGTERM (timeout, a scheduler) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = (deploy_app if args.deployment else simulate)(app, args, env, stream, own_home)
    finally:
        # The last line is what a person acts on: the cause of a failure, or where the results are.
        if code and (stream.failure or stream.error):
            print(f"run failed: {stream.failure or stream.error}", flush=True)
        elif code == 0 and stream.results:
            print(f"results written to {stream.results}", flush=True)
    return code


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def deploy_app(app: Path, args: argparse.Namespace, env: dict, stream: Stream, own_home: bool) -> int:
    """``--deployment N``: the app on a loopback SuperLink and N SuperNodes."""
    from .deploy import deploy

    code = 1
    try:
        code = deploy(app, args.deployment, args.secure, args.run_config, env, stream, args.unregistered)
        return code
    finally:
        if own_home and code == 0:  # a temporary home: nothing to keep after a clean run
            shutil.rmtree(env["FLWR_HOME"], ignore_errors=True)
        else:
            print(f"logs kept in {Path(env['FLWR_HOME']) / 'deployment'}", flush=True)


def simulate(app: Path, args: argparse.Namespace, env: dict, stream: Stream, own_home: bool) -> int:
    """The app in Flower's simulation engine on a local SuperLink (started here unless one runs)."""
    owned = None
    if not superlink_healthy():
        owned = start_superlink(env, Path(env["FLWR_HOME"]) / "superlink.log")
        print(f"started SuperLink (pid {owned.pid})", flush=True)
    else:
        print("using the SuperLink already serving 127.0.0.1:39091 (not started here, so left running; the apps run in "
              "the Python environment it was started from)", flush=True)
    command = [
        shutil.which("flwr") or "flwr", "run", str(app), "local", "--stream",
        "--federation-config", f"num-supernodes={args.supernodes} client-resources-num-cpus=1",
    ]
    if args.run_config:
        command += ["--run-config", args.run_config]
    code = 1
    try:
        code = stream.outcome(*stream(command, env), env)
        return code
    finally:
        if owned is not None:
            stop(owned)
            print(f"stopped SuperLink (pid {owned.pid})", flush=True)
        if own_home:  # our FLWR_HOME: installed apps, config, the SuperLink log if we started it
            if code == 0 or owned is None:
                shutil.rmtree(env["FLWR_HOME"], ignore_errors=True)
            else:
                print(f"SuperLink log kept in {env['FLWR_HOME']}", flush=True)

