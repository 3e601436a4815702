"""On the GPU: the W8A8 routed experts (effjax.models.moe.int8_gmm, int8 x int8 jax.lax.ragged_dot)
against an exact reference, forward and gradient, at bf16 and float32 inputs.
  python experiments/gpu_smoke/moe_w8a8_check.py

Four numbers per input dtype, so that a mismatch says where it comes from:
  - the integer accumulator alone: jax.lax.ragged_dot of the int8 rows and experts with int32
    accumulation against numpy's int64 product of the same values (must be exactly equal);
  - the same product with the int8 values carried in bf16 and float32 accumulation (exact for
    these sizes: every partial sum is an integer below 2^24), the alternative formulation;
  - the activation rounding alone (moe.int8_rows on the device against numpy's float32 division
    and half-to-even rounding): entries may differ only by 1 and only at quotients within a few
    float32 steps of a half-integer (a division that differs in the last place rounds such a tie
    the other way; the H100 rounded 1 entry of 476,672 differently at float32 inputs);
  - int8_gmm's output against the float64 product of the rows as the device rounded them and
    the dequantized experts, over the rows the groups cover; rows past them must be zero.
Exits 1 if any of these is off (accumulators not exact, an entry rounded differently other than
at a tie, or the forward's relative error above 1e-5)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from effjax.models import moe


def _exact(xq, q, sizes, rows):
  """numpy int64 grouped product of int8 rows and experts; rows past the groups are 0."""
  want, start = np.zeros((rows, q.shape[2]), np.int64), 0
  for g, size in enumerate(sizes):
    want[start:start + size] = xq[start:start + size].astype(np.int64) @ q[g].astype(np.int64)
    start += size
  return want


def main() -> int:
  rng = np.random.default_rng()
  groups, k, n = 8, 512, 256
  sizes = rng.integers(0, 200, groups)
  covered = int(sizes.sum())
  rows = covered + 7
  gs = jnp.asarray(sizes, jnp.int32)
  failed = []
  print(jax.devices()[0].device_kind, 'JAX', jax.__version__)

  # The accumulator alone, on random int8 values.
  xq = rng.integers(-127, 128, (rows, k)).astype(np.int8)
  q_np = rng.integers(-127, 128, (groups, k, n)).astype(np.int8)
  want = _exact(xq, q_np, sizes, rows)
  acc = np.asarray(jax.jit(lambda a, b, g: jax.lax.ragged_dot(
      a, b, g, preferred_element_type=jnp.int32))(jnp.asarray(xq), jnp.asarray(q_np), gs),
      np.int64)
  carried = np.asarray(jax.jit(lambda a, b, g: jax.lax.ragged_dot(
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), g, preferred_element_type=jnp.float32))(
          jnp.asarray(xq), jnp.asarray(q_np), gs), np.float64)
  for name, got in (('int8 x int8 -> int32 ragged_dot', acc),
                    ('int8 values in bf16 -> float32 ragged_dot', carried)):
    wrong = got[:covered] != want[:covered]
    scale = np.abs(want).max()
    print(f'{name}: {int(wrong.sum())} of {wrong.size} entries differ from the exact product, '
          f'largest difference {np.abs(got[:covered] - want[:covered]).max() / scale:.2e} of the '
          f'largest entry; rows past the groups: max |value| {np.abs(got[covered:]).max():.3g}')
    if wrong.any():
      failed.append(name)

  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    q = jnp.asarray(q_np)
    s = jnp.asarray(rng.uniform(1e-3, 1e-2, (groups, 1, n)), jnp.float32)
    act = jnp.float32(0.8 * float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 127)
    y = np.asarray(jax.jit(moe.int8_gmm)(x, act, q, s, gs), np.float64)
    # The rows as the function rounds them: float32 division by the scale, half to even.
    quotient = np.asarray(x.astype(jnp.float32)) / np.float32(act)
    x_rounded = np.clip(np.round(quotient), -127, 127)
    on_device = np.asarray(jax.jit(moe.int8_rows)(x, act), np.float64)
    flipped = on_device != x_rounded
    # A device whose float32 division differs from numpy's in the last place (a reciprocal
    # multiply) rounds a quotient within a few float32 steps of a half-integer to the other
    # neighbour, which is equally valid. The H100 rounded 1 entry of 476,672 differently (whether
    # at such a tie was not recorded then). Anything else fails.
    tie_gap = np.abs(np.abs(quotient - np.floor(quotient)) - 0.5)
    at_ties = bool(np.all(tie_gap[flipped] <= 4 * np.spacing(np.abs(quotient[flipped]))))
    by_one = bool(np.all(np.abs(on_device - x_rounded) <= 1))
    print(f'{jnp.dtype(dtype).name} rows rounded on the device (int8_rows): {int(flipped.sum())} '
          f'of {flipped.size} entries differ from numpy\'s float32 division and rounding'
          + (f', by at most {np.abs(on_device - x_rounded).max():.0f}, every one at a quotient '
             f'within 4 float32 steps of a half-integer: {at_ties}' if flipped.any() else ''))
    if not (at_ties and by_one):
      failed.append(f'int8_rows {jnp.dtype(dtype).name}')
    # The product is checked on the device's own rounding, so it measures the accumulator.
    exact = _exact(on_device.astype(np.int8), q_np, sizes, rows).astype(np.float64)
    rows_of = np.repeat(np.arange(groups), sizes)
    ref = exact[:covered] * float(act) * np.asarray(s, np.float64)[rows_of, 0]
    err = np.abs(y[:covered] - ref).max() / np.abs(ref).max()
    past = np.abs(y[covered:]).max()
    cot = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(moe.int8_gmm(x, act, q, s, gs) * cot)))(x)
    print(f'int8_gmm, {jnp.dtype(dtype).name} rows: forward max relative error {err:.2e}, rows '
          f'past the groups max |y| {past:.3g}; gradient finite '
          f'{bool(jnp.all(jnp.isfinite(dx)))}, nonzero {bool(jnp.any(dx != 0))}')
    if not err < 1e-5 or past != 0:
      failed.append(f'int8_gmm {jnp.dtype(dtype).name}')
  print('FAILED: ' + '; '.join(failed) if failed else 'all exact')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
