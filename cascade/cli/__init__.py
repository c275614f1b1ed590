"""Command-line entry point. Each module below adds its commands to `app`."""

from __future__ import annotations

from cascade.cli import bank, bench, calibrate, drift, models, moderate, review, sample, schemas, stream, train  # noqa: F401  (registers commands)
from cascade.cli.app import app, fail
from cascade.settings import SettingsError


def main() -> None:
    try:
        app()
    except SettingsError as exc:  # raised by any command's Settings(): one line, exit 2
        raise SystemExit(fail(str(exc)).exit_code) from None
