"""fedlowrank: run an app (simulation or loopback deployment), report on results, make certificates.

    fedlowrank run adult-married [--supernodes 5 | --deployment 3 [--secure]] [--run-config "..."]
    fedlowrank report results/adult_married-*.json [--out DIR] [--format md|html]
    fedlowrank certs docker --sites 3

Tooling around Flower's own CLI (``flwr run``, ``flower-superlink``, ``flower-supernode``): it
starts and stops those processes; it does not import Flower itself.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "run": ("fedlowrank.cli.runner", "run an app with flwr run on a SuperLink this command owns (simulation or --deployment)"),
    "report": ("fedlowrank.cli.report", "a Markdown/HTML report with plots of results files (needs the [plot] extra)"),
    "certs": ("fedlowrank.cli.deploy", "make TLS certificates and SuperNode keys for docker/"),
}


def usage() -> str:
    lines = ["usage: fedlowrank {run,report,certs} ...", "", __doc__.strip().splitlines()[0], "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "fedlowrank <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"fedlowrank: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    code = module.main(argv[1:])
    return int(code or 0)
