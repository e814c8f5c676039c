"""``python -m normstats compare ...``: hands over to the command line of the comparison."""

from __future__ import annotations


def main() -> int:
    import importlib

    cli = importlib.import_module("normstats.adapters.compare.cli")
    return int(cli.main())


if __name__ == "__main__":
    raise SystemExit(main())
