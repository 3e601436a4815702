"""The weight-only quantized matmul's specification: what the kernel and the XLA path compute.

Storage (the layouts effjax.compress.quantize writes, flattened to one input axis K and one output
axis N; qwix's convention, dequantized = value * scale):

  int8  q [K, N] int8, scale [1, N]: one scale per output column.
  int4  packed [K / 2, N] uint8: K entries 2i and 2i + 1 share byte i, 2i in the low nibble and
        2i + 1 in the high one, each a two's-complement value in [-8, 7]; scale [K / group, N]:
        one scale per column for each run of `group` consecutive K entries.

x [..., K] times the dequantized weight gives [..., N]. These functions dequantize in float32
and multiply at HIGHEST precision (exact float32 on every platform) and return float32: the
exact value every backend approximates. The op's 'xla' backend uses the same dequantization but
rounds the weight to x's dtype and multiplies at the platform's default precision.

Nothing here imports effjax.compress (which imports this module's unpacker): the tests check
these layouts against its packer and qwix's dequantization, so they cannot drift apart unnoticed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def unpack_int4(packed: jax.Array, axis: int = 0) -> jax.Array:
  """uint8 -> int8 values in [-8, 7], `axis` doubled: entry 2i from byte i's low nibble, 2i + 1
  from its high one ([K/2, N] -> [K, N] with the default axis). The one unpacker of the project:
  effjax.compress.quantize uses it for every stored int4 weight."""
  low = (packed & 0xF).astype(jnp.int8)
  high = (packed >> 4).astype(jnp.int8)
  both = (jnp.stack([low, high], axis=axis + 1) ^ 8) - 8  # sign-extend the nibbles
  shape = packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:]
  return both.reshape(shape)


def dequantize_int8(q_kn: jax.Array, scale_1n: jax.Array) -> jax.Array:
  """int8 [K, N] * scale [1, N] -> float32 [K, N]."""
  return q_kn.astype(jnp.float32) * scale_1n.astype(jnp.float32)


def dequantize_int4(packed_kn: jax.Array, scale_gn: jax.Array, group: int) -> jax.Array:
  """Packed int4 [K/2, N] with scales [K/group, N] -> float32 [K, N]."""
  q_kn = unpack_int4(packed_kn)
  k, n = q_kn.shape
  q_gkn = q_kn.reshape(k // group, group, n).astype(jnp.float32)
  return (q_gkn * scale_gn.astype(jnp.float32)[:, None, :]).reshape(k, n)


def _product(x: jax.Array, w_kn: jax.Array, precision) -> jax.Array:
  return jnp.matmul(x.astype(jnp.float32), w_kn, precision=precision)


def int8_matmul_reference(x: jax.Array, q_kn: jax.Array, scale_1n: jax.Array, *,
                          precision=_HIGHEST) -> jax.Array:
  """x [..., K] @ (q [K, N] * scale [1, N]) -> float32 [..., N]."""
  return _product(x, dequantize_int8(q_kn, scale_1n), precision)


def int4_matmul_reference(x: jax.Array, packed_kn: jax.Array, scale_gn: jax.Array, group: int, *,
                          precision=_HIGHEST) -> jax.Array:
  """x [..., K] @ dequantized packed int4 [K/2, N] (group scales [K/group, N]) -> float32."""
  return _product(x, dequantize_int4(packed_kn, scale_gn, group), precision)
