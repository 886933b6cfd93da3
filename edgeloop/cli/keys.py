"""``edgeloop keys``: the fleet's ed25519 signing key."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Fleet signing keys.", no_args_is_help=True)


@app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="Folder for fleet.key (0600) and fleet.pub."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Create a signing key pair: DIR/fleet.key (mode 0600) and DIR/fleet.pub."""
    from runtime.artifacts import generate_keypair, key_id, load_public_key

    key, pub = generate_keypair(out, overwrite=force)
    typer.echo(f"signing key  {key} (mode 0600, keep it in the cloud)")
    typer.echo(f"public key   {pub} (install on every device)")
    typer.echo(f"key id       {key_id(load_public_key(pub))}")
