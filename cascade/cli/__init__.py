"""Command-line entry point. Each module below adds its commands to `app`."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from cascade.cli import bank, bench, calibrate, models, moderate, sample, schemas, stream, train  # noqa: F401  (registers commands)
from cascade.cli.app import app


def main() -> None:
    try:
        app()
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A bad setting (environment or CASCADE_CONFIG): one line each, no traceback. The value is not
        # echoed: it may hold a key (e.g. inside CASCADE_LLM_FALLBACK's JSON).
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            where = ".".join(str(part) for part in error["loc"])
            typer.secho(
                f"error: setting {where} (CASCADE_{name.upper()}, or {name} in the CASCADE_CONFIG file): "
                f"{error['msg']}",
                fg=typer.colors.RED,
                err=True,
            )
        raise SystemExit(2) from None
