"""`python -m bcdnet_jax.prepare`: see `bcdnet_jax.data.prepare` (the `bcdnet-prepare`
console script)."""

from bcdnet_jax.data.prepare import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
  cli()
