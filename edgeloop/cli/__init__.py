"""Root of the ``edgeloop`` command; each sub-app lives in its own module and imports its side lazily."""

from __future__ import annotations

import logging
import sys

import typer

from edgeloop.cli import cloud as cloud_cmd
from edgeloop.cli import demo as demo_cmd
from edgeloop.cli import device as device_cmd
from edgeloop.cli import fleet as fleet_cmd
from edgeloop.cli import keys as keys_cmd
from edgeloop.cli import model as model_cmd
from edgeloop.cli import sim as sim_cmd
from edgeloop.cli.common import fail
from runtime.errors import EdgeloopError

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgeloop",
    help="Edge inference with cloud sync: predict on the device, keep every result, roll out better models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(model_cmd.app, name="model")
app.add_typer(device_cmd.app, name="device")
app.add_typer(cloud_cmd.app, name="cloud")
app.add_typer(fleet_cmd.app, name="fleet")
app.add_typer(sim_cmd.app, name="sim")
app.command("demo")(demo_cmd.demo)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except EdgeloopError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
