"""Command-line entry point. Each module below adds its commands to `app`."""

from __future__ import annotations

from cascade.cli import bank, bench, calibrate, drift, models, moderate, review, sample, schemas, stream, train  # noqa: F401  (registers commands)
from cascade.cli.app import app


def main() -> None:
    app()
