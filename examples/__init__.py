"""Example networks built from `bcdnet_jax.nn` (see docs/building-bnns.md)."""
