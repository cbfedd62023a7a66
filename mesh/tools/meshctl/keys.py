"""``meshctl keys NAME --dir DIR``: a node's CURVE keypair for the node links
(``mesh.io.curve`` reads them; its docstring says where each file goes)."""

from __future__ import annotations

import os

import click
import zmq.auth


@click.command(name="keys")
@click.argument("name")
@click.option("--dir", "key_dir", required=True, type=click.Path(file_okay=False),
              help="directory for NAME.key (public) and NAME.key_secret (secret, mode 0600)")
@click.option("--force", is_flag=True, help="replace an existing keypair")
def keys_command(name: str, key_dir: str, force: bool) -> None:
    """Make a CURVE keypair for node NAME (its node.name) in DIR.

    Give NAME.key_secret to that node only (security.curve_secret_key) and put every node's
    NAME.key into the directory all nodes read (security.curve_public_keys)."""
    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter("a node name without '/' and not starting with '.'", param_hint="NAME")
    os.makedirs(key_dir, exist_ok=True)
    public_file = os.path.join(key_dir, f"{name}.key")
    secret_file = public_file + "_secret"
    if not force and (os.path.exists(public_file) or os.path.exists(secret_file)):
        raise click.ClickException(f"{public_file} exists (--force replaces it)")
    old_umask = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(key_dir, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    click.echo(f"public {public_file}")
    click.echo(f"secret {secret_file}")
