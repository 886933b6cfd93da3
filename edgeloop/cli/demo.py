"""``edgeloop demo``: the whole loop on one machine."""

from __future__ import annotations

import typer


def demo() -> None:
    """Run the demo."""
    typer.echo("demo: not yet")
