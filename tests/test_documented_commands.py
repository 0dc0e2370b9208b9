"""Every command the README and the docs show, checked as written.

The commands are read out of the Markdown (fenced ``bash`` blocks and inline code that starts
with a program), so a command added to the docs is checked without anyone listing it here; a
command of a kind this file does not know fails the test until it says how to check it.

How each kind is checked: the programs' own argument parsers take the arguments as written
(they stop there: the experiments behind ``docs/results.md`` take hours); run-config overrides
name only keys the app declares and values :class:`~fedlowrank.runconfig.RunSettings` accepts;
experiment rules build their strategies and settings exist; extras exist in ``pyproject.toml``;
files and folders named exist; the cheap commands (``--help``, ``certs``) run for real. The
commands that run end to end are executed by the tests named in :data:`EXECUTED_BY`.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docker" / "README.md"]
PROGRAMS = ("python ", "fedlowrank ", "flwr ", "pip ", "docker ")

# Program names mentioned in prose, not commands to run.
MENTIONS = {
    "flwr run", "fedlowrank run", "flwr ls", "flwr stop", "flwr run --stream", "python simulations/run.py",
    "python -m fedlowrank", "flwr supernode register", "fedlowrank report", "fedlowrank certs",
}

EXECUTED_BY = {
    "README.md: the first two commands": "tests/test_fresh_install.py (a new venv, as written)",
    "simulations/run.py adult-married ...": "tests/test_simulation.py, tests/test_secure_app.py",
    "--deployment 3 --secure": "tests/test_deployment.py",
    "fedlowrank report": "tests/test_report.py",
    "fairlora-images": "tests/test_imaging_app.py",
    "the own-app blocks": "tests/test_readme_example.py",
    "docker compose / flwr supernode register": "tests/test_docker.py (compose files validated)",
}


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command in the docs, continuation lines joined, comments cut."""
    found = []
    for path in DOCS:
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if lang not in ("bash", "sh", "shell"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                if line and not line.startswith("#"):
                    found.append((where, line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            if span.startswith(PROGRAMS) and span not in MENTIONS:
                found.append((where, span))
    return found


COMMANDS = documented_commands()


class Parsed(Exception):
    """Raised by the patched parser once the arguments parsed: nothing after it runs."""


@pytest.fixture
def parse_only(monkeypatch):
    """``run(callable)`` -> the namespace the program's argparse made of its arguments."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)

    def run(call):
        try:
            call()
        except Parsed as parsed:
            return parsed.args[0]
        except SystemExit as err:
            raise AssertionError(f"the arguments were refused (exit {err.code})") from None
        raise AssertionError("the program never parsed its arguments")

    return run


def run_script(path: Path, argv: list[str]):
    def call():
        old = sys.argv
        sys.argv = [str(path), *argv]
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = old
    return call


def run_module(module: str, argv: list[str]):
    def call():
        old = sys.argv
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = old
    return call


def check_run_config(app: Path, overrides: str) -> None:
    from fedlowrank.cli.runner import check_run_config as runner_check
    from fedlowrank.cli.runner import declared_config, parse_run_config
    from fedlowrank.runconfig import RunSettings

    runner_check(app, overrides)
    RunSettings.from_config({**declared_config(app), **parse_run_config(overrides)})


def option(argv: list[str], name: str, default: str = "") -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def check_app_run(argv: list[str], parse_only) -> None:
    """``fedlowrank run`` / ``simulations/run.py``: the runner's parser, the app, its run config."""
    from fedlowrank.cli import runner

    args = parse_only(lambda: runner.main(argv))
    app = Path(args.app) if Path(args.app).exists() else ROOT / "simulations" / args.app
    assert (app / "pyproject.toml").exists(), f"no app {args.app}"
    check_run_config(app, args.run_config)


def check_experiment(argv: list[str], parse_only) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import experiment
    from experiment_settings import SETTINGS, Regime

    args = parse_only(lambda: experiment.main(argv))
    if argv[0] != "run":
        return
    assert args.setting in SETTINGS, args.setting
    regime = Regime(lr=args.lr, local_epochs=args.local_epochs, rounds=args.rounds, sites=args.sites,
                    fraction=args.fraction, rank=args.rank, init=args.init,
                    client_ranks=tuple(int(r) for r in args.client_ranks.split(",")) if args.client_ranks else ())
    for rule in experiment.split_rules(args.rules):
        if rule != experiment.FULL_MODEL_RULE:
            experiment.make_strategy(rule, regime)  # an unknown rule or option is refused here


def check_pip(argv: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    for arg in argv[1:]:
        named = re.fullmatch(r"(?:-e )?(?:\.|fedlowrank)\[([\w,]+)\]", arg.strip("'\""))
        if named:
            unknown = set(named.group(1).split(",")) - extras
            assert not unknown, f"extras {unknown} are not in pyproject.toml ({sorted(extras)})"
        elif arg.startswith(("torch==", "torchvision==")):
            assert arg in (ROOT / ".ci" / "run").read_text(), f"{arg} is not what CI installs"


def check(command: str, parse_only, tmp_path, monkeypatch) -> str:
    """Check one documented command; what was checked, for the failure message."""
    if "<" in command and ">" in command or "path/to/" in command:
        return "a template (<placeholders>, path/to/): its program and options are checked where written out"
    words = shlex.split(command.replace("$i", "1"))
    if words[:2] == ["pip", "install"]:
        check_pip(words[1:])
        return "extras exist"
    if words[0] in ("sudo", "cd", "mkdir", "cp", "for", "SUPERLINK=my-server.example.org:9093") or words[0] == "docker":
        return "a deployment step: docker/README.md's walkthrough, validated by tests/test_docker.py"
    if words[:2] == ["python", "-m"]:
        if words[2] == "pytest":
            return "the test command (CI runs it)"
        if words[2] == "fedlowrank":
            assert subprocess.run([sys.executable, *words[1:], "--help"], capture_output=True).returncode == 0
            return "ran"
        module = words[2]  # an app's own module, run from its folder as the docs say
        app = ROOT / "simulations" / module.split(".")[0].replace("_", "-")
        source = (app / Path(*module.split("."))).with_suffix(".py")
        assert source.exists(), f"{module} is not in {app}"
        if "argparse" not in source.read_text():  # takes no arguments (prepare.py rewrites the app's assets)
            assert len(words) == 3 and "def main(" in source.read_text(), f"{module} takes no arguments"
            return "exists, takes no arguments"
        monkeypatch.syspath_prepend(str(app))
        parse_only(run_module(module, words[3:]))
        return "parsed"
    if words[0] == "python":
        script = ROOT / words[1]
        assert script.exists(), f"{words[1]} does not exist"
        if words[1] == "simulations/run.py":
            check_app_run(words[2:], parse_only)
        elif words[1] == "benchmarks/experiment.py":
            check_experiment(words[2:], parse_only)
        else:
            parse_only(run_script(script, words[2:]))
        return "parsed"
    if words[0] == "fedlowrank":
        if words[1] in ("--help", "-h"):
            from fedlowrank.cli import main

            assert main(words[1:]) == 0
        elif words[1] == "run":
            check_app_run(words[2:], parse_only)
        elif words[1] == "certs":  # cheap: made for real, in a temporary folder
            out = tmp_path / words[2]
            done = subprocess.run([sys.executable, "-m", "fedlowrank", "certs", str(out), *words[3:]], capture_output=True, text=True)
            assert done.returncode == 0 and (out / "certificates" / "ca.crt").exists(), done.stderr[-2000:]
        elif words[1] == "report":
            from fedlowrank.cli import main

            parse_only(lambda: main(words[1:]))
        else:
            raise AssertionError(f"fedlowrank {words[1]}: unknown command")
        return "checked"
    if words[:2] == ["flwr", "run"]:
        app = ROOT / words[2]
        assert (app / "pyproject.toml").exists(), f"{words[2]} is not an app"
        check_run_config(app, option(words, "--run-config"))
        return "app and run config checked"
    if words[:3] == ["flwr", "supernode", "register"]:
        return "a deployment step: docker/README.md's walkthrough, validated by tests/test_docker.py"
    raise AssertionError("a documented command of a kind this test cannot check: teach tests/test_documented_commands.py")


def test_the_docs_show_commands_and_this_file_finds_them():
    where = {w for w, _ in COMMANDS}
    assert len(COMMANDS) > 60 and {"README.md", "docs/results.md", "docker/README.md"} <= where


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_a_documented_command_works_as_written(where, command, parse_only, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        check(command, parse_only, tmp_path, monkeypatch)
    except AssertionError as err:
        raise AssertionError(f"{where}: `{command}`: {err}") from None


@pytest.mark.parametrize("wrong", [
    "python simulations/run.py adult-married --run-config \"num-server-round=3\"",  # a misspelt key
    "python simulations/run.py adult-married --run-config \"rank=0\"",  # a value out of range
    "python benchmarks/experiment.py run --setting digits --rules exact/momentum=2 --out x.json",  # a refused option
    "python benchmarks/experiment.py run --setting digitz --rules exact --out x.json",  # no such setting
    "pip install -e \".[plots]\"",  # no such extra
    "python benchmarks/nowhere.py --fast",  # no such script
    "fedlowrank run adult-married --superndoes 3",  # an option the runner lacks
])
def test_a_wrong_command_in_the_docs_would_fail_this_file(wrong, parse_only, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises((AssertionError, SystemExit, ValueError)):
        check(wrong, parse_only, tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- Python snippets

# Blocks another test runs as written.
RUN_ELSEWHERE = {
    ("README.md", 1): "tests/test_readme_example.py::test_readme_app_runs_through_flwr_run",
    ("README.md", 2): "tests/test_readme_example.py::test_readme_quickstart_client_under_lgreco",
    ("docs/design.md", 0): "tests/test_core_without_flower.py",
    ("docs/design.md", 1): "tests/test_extending.py",
    ("docs/design.md", 2): "tests/test_extending.py",
    ("docs/design.md", 3): "tests/test_extending.py",
}

# What a fragment takes as given (the reader's own data), and text standing for "and so on".
FAIRNESS_DATA = """
import numpy as np
rng = np.random.default_rng(0)
G = 2
y_true, groups = rng.integers(0, 2, 400), rng.integers(0, G, 400)
probs = np.clip(0.35 * y_true + 0.65 * rng.random(400), 0, 1)
"""
SAVED_ADAPTER = """
import sys, tempfile
sys.path.insert(0, "simulations/adult-married")
from adult_married.model import ADAPTER_TARGETS, TRAINABLE, load_base_model
from fedlowrank.adapters import exchange_state, inject_adapters, save_adapter
trained = load_base_model()
inject_adapters(trained, ADAPTER_TARGETS, rank=4, trainable=TRAINABLE)
adapter_file = save_adapter(tempfile.mkdtemp() + "/run.adapter.safetensors",
                            {k: v.numpy() for k, v in exchange_state(trained).items()}, {"rank": 4})
"""
GIVEN = {
    ("README.md", 0): SAVED_ADAPTER,  # a run's adapter, as the ServerApp saves it
    ("docs/aggregation.md", 1): "from fedlowrank.strategies import FedLowRank\n",
    ("docs/aggregation.md", 2): "from fedlowrank.strategies import FedLowRank\n",
    ("docs/fairness.md", 0): FAIRNESS_DATA,
    ("docs/fairness.md", 1): FAIRNESS_DATA + "from fedlowrank.fairness import local_statistics\n",
    ("docs/fairness.md", 2): FAIRNESS_DATA + (
        "from fedlowrank.fairness import federated_report, local_statistics, merge_statistics\n"
        "stats_1 = local_statistics(y_true[:200], probs[:200], groups[:200], num_groups=G)\n"
        "stats_K = local_statistics(y_true[200:], probs[200:], groups[200:], num_groups=G)\n"),
    ("docs/models.md", 0): (  # the reader's own weights file: here a random ResNet-18's, saved as they would be
        "import torchvision\nfrom safetensors.torch import save_file\n"
        "net = torchvision.models.resnet18(num_classes=2)\n"
        "net.conv1 = __import__('torch').nn.Conv2d(1, 64, 7, 2, 3, bias=False)\n"
        "save_file({k: v.contiguous() for k, v in net.state_dict().items()}, 'resnet18-chest.safetensors')\n"),
}
RUN_FROM_THE_REPOSITORY = {("README.md", 0)}  # paths in it are the repository's
STANDS_FOR = {("docs/fairness.md", 2): (", ..., ", ", ")}
# Blocks that need a live federation (a grid of clients): their imports and names are checked here,
# the same calls run in the tests named.
NEEDS_A_FEDERATION = {
    ("docs/models.md", 1): "tests/test_peft_interop.py",
    ("docs/secure.md", 0): "tests/test_secure_rounds.py",
}


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file, index among the file's python blocks, code)``."""
    found = []
    for path in DOCS:
        blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S) if lang == "python"]
        found += [(str(path.relative_to(ROOT)), i, body) for i, body in enumerate(blocks)]
    return found


BLOCKS = python_blocks()


@pytest.mark.parametrize("where,index,code", BLOCKS, ids=[f"{w}:{i}" for w, i, _ in BLOCKS])
def test_a_documented_python_block_runs(where, index, code, tmp_path, monkeypatch):
    key = (where, index)
    compile(code, f"{where} block {index}", "exec")
    if key in RUN_ELSEWHERE:
        return
    monkeypatch.chdir(ROOT if key in RUN_FROM_THE_REPOSITORY else tmp_path)
    if key in NEEDS_A_FEDERATION:
        imports = "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))
        exec(compile(imports, f"{where} block {index} imports", "exec"), {})
        return
    old, new = STANDS_FOR.get(key, ("", ""))
    exec(compile(GIVEN.get(key, "") + (code.replace(old, new) if old else code), f"{where} block {index}", "exec"), {})


def test_every_block_another_test_runs_is_still_in_the_docs():
    present = {(w, i) for w, i, _ in BLOCKS}
    assert set(RUN_ELSEWHERE) | set(GIVEN) | set(NEEDS_A_FEDERATION) <= present
