"""``python simulations/plot_results.py RESULTS ...`` is ``fedlowrank report RESULTS ...``."""

from fedlowrank.cli.report import main

if __name__ == "__main__":
    raise SystemExit(main())
