"""Plots every registered sign quantizer's forward and surrogate gradient (docs/img).

    python scripts/plot_quantizers.py [--out docs/img/quantizers.png]

The curves are computed by the quantizers themselves (`jax.vmap(jax.grad(q))`), so the
figure shows what the code does, not a drawing of it.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bcdnet_jax.nn import quantizers  # noqa: E402

SHOWN = [("approx", "ApproxSign ('approx', released)"), ("ste", "clipped STE ('ste')"),
         ("identity", "identity STE ('identity')"),
         ("scaled_sign", "scaled weight sign ('scaled_sign'),\none weight of a channel")]


def curves(name, x):
  q = quantizers.get(name)
  if name == "scaled_sign":
    # One entry w of a channel whose other entries are fixed at +-0.5: the forward is
    # mean|W| * sign(w), the gradient of that entry the clipped STE.
    rest = jnp.array([0.5, -0.5, 0.5])

    def one(w):
      return q(jnp.concatenate([w[None], rest])[:, None])[0, 0]
  else:
    one = q
  return jax.vmap(one)(x), jax.vmap(jax.grad(one))(x)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="docs/img/quantizers.png")
  a = p.parse_args()
  x = jnp.linspace(-2, 2, 801)
  fig, axes = plt.subplots(2, len(SHOWN), figsize=(3.2 * len(SHOWN), 5), sharex=True)
  for i, (name, title) in enumerate(SHOWN):
    y, g = curves(name, x)
    axes[0, i].plot(x, y, color="C0")
    axes[0, i].set_title(title, fontsize=9)
    axes[1, i].plot(x, g, color="C3")
    for ax in axes[:, i]:
      ax.axvline(0, color="0.8", lw=0.8)
      ax.axhline(0, color="0.8", lw=0.8)
      ax.grid(alpha=0.3)
    axes[1, i].set_xlabel("x" if name != "scaled_sign" else "w")
  axes[0, 0].set_ylabel("forward q(x)")
  axes[1, 0].set_ylabel("backward dq/dx (surrogate)")
  fig.tight_layout()
  fig.savefig(a.out, dpi=110)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
