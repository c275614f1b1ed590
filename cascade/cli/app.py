"""The `cascade` Typer application; command modules register themselves on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cascade",
    help="Streaming content moderation: hash, retrieval, classifier and LLM stages with calibrated bands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bank_app = typer.Typer(help="Manage the hash banks and the exemplar bank.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an operator error and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)
