"""`python -m cascade.stream ARGS` is `cascade worker ARGS`, without loading the other commands."""

import typer

from cascade.stream.worker import worker_command

typer.run(worker_command)
