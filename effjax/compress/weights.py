"""Compressed weights: modules that stand in for a projection's `nnx.Param` inside any mixer.

Every mixer's and feed-forward's projections call `effjax.models.layers.matmul(equation, x,
self.w, dtype)` (or `layers.matmuls` for several sharing x: attention's q/k/v, SwiGLU's gate/up,
the state-space layers' input projections); other code may read a weight as `self.w[...]`
(the MoE experts' stacked weights, the norms). A compressed weight answers both:
`w[...]` gives the dense matrix it represents (computed inside the jitted step, one layer at a
time under the layer scan), and `w.einsum(equation, x, dtype)` computes the product its own way
(low-rank and LoRA as two thin matmuls, W8A8 as an int8 x int8 matmul with int32 accumulation,
int8 / int4 weight-only through effjax.kernels.quantized_matmul: on GPU at decode sizes a kernel
that reads the stored bytes once; elsewhere the dequantized weight times x, as before).
So a compression applies to every mixer of the registry without a change to its code, and
every projection but the MoE experts' (grouped matmuls over the dense values) gets the
compressed product (`einsum_group`: quantized weights sharing x in one kernel launch).

A weight's dimensions are read from its logical axis names: leading batch axes ('layers' of the
scanned stack, 'experts'), then its input (contracted) axes, then its output axes. Input axes are
one axis, or ('heads', 'head_dim') for the output projections of attention and state-space
layers (wo, w_out). Per-channel quantization scales are per output channel (and layer, expert);
int4 groups run along the last input axis; SVD and LoRA factor [inputs, outputs].

`restructure(model, compress_cfg)` swaps the configured parameters of a built model for these
modules (quantizing, factoring or wrapping the values they hold), so the structure of a
compressed model is a function of the config and a compressed checkpoint restores like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from effjax.compress import quantize as q_lib
from effjax.kernels import quantized_matmul as qmm

BATCH_AXES = ('layers', 'experts')
TWO_INPUT_AXES = ('heads', 'head_dim')  # wo [heads, head_dim, embed] contracts both
QUANT_METHODS = ('int8', 'w8a8', 'fp8', 'int4')
QAT_METHODS = ('qat_int8', 'qat_int4')
PRUNE_METHODS = ('magnitude', '2:4')
STRUCTURAL = QUANT_METHODS + QAT_METHODS + ('lowrank', 'lora')  # methods that change the tree
LORA_QUANTIZED_BASES = ('int8', 'int4')  # compress.lora_base_dtype values that quantize the base
# The float leaves of a QuantizedWeight: its scales, kept float32 wherever float weights are cast
# (decoding's weights) and never trained.
QUANT_SCALE_NAMES = frozenset({'scale', 'act_scale'})


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a weight's batch, input and output axes are (counted on the stored, stacked array)."""
  names: tuple
  batch: int
  inputs: int

  @property
  def outputs(self) -> int:
    return len(self.names) - self.batch - self.inputs

  def axes(self, kind: str, ndim: int | None = None) -> tuple[int, ...]:
    """Axis indices of 'batch', 'inputs' or 'outputs' on an array of ndim dims (default: stored).

    Inside the layer scan a weight has lost its 'layers' axis; counting from the end keeps the
    input and output axes right either way.
    """
    ndim = len(self.names) if ndim is None else ndim
    batch = ndim - self.inputs - self.outputs
    if kind == 'batch':
      return tuple(range(batch))
    if kind == 'inputs':
      return tuple(range(batch, batch + self.inputs))
    return tuple(range(batch + self.inputs, ndim))


def layout_of(names: tuple) -> Layout:
  names = tuple(names)
  batch = 0
  while batch < len(names) and names[batch] in BATCH_AXES:
    batch += 1
  rest = names[batch:]
  if not rest:
    raise ValueError(f'a weight with axes {names} has no input axis to compress')
  inputs = 2 if len(rest) > 2 and rest[:2] == TWO_INPUT_AXES else 1
  return Layout(names, batch, inputs)


def _param(value: jax.Array, names) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _letters(equation: str, count: int) -> str:
  free = [c for c in string.ascii_letters if c not in equation]
  return ''.join(free[:count])


def _split_equation(equation: str, layout: Layout, ndim: int):
  """(lhs, weight input letters, weight output letters, out) or None when the form is unusual."""
  inputs, out = equation.replace(' ', '').split('->')
  lhs, rhs = inputs.split(',')
  if len(rhs) != ndim or ndim != layout.inputs + layout.outputs:
    return None  # a weight that kept batch axes here: use the dense path
  return lhs, rhs[:layout.inputs], rhs[layout.inputs:], out


def factored_einsum(equation: str, x: jax.Array, a: jax.Array, b: jax.Array,
                    layout: Layout) -> jax.Array | None:
  """x @ (a @ b) as (x @ a) @ b for a [inputs, rank], b [rank, outputs]; None if not applicable."""
  parts = _split_equation(equation, layout, a.ndim + b.ndim - 2)
  if parts is None:
    return None
  lhs, ins, outs, out = parts
  r = _letters(equation, 1)
  mid = ''.join(c for c in lhs if c not in ins) + r
  h = jnp.einsum(f'{lhs},{ins}{r}->{mid}', x, a.astype(x.dtype))
  return jnp.einsum(f'{mid},{r}{outs}->{out}', h, b.astype(x.dtype))


def _product(a: jax.Array, b: jax.Array, layout: Layout) -> jax.Array:
  """The dense [batch..., inputs..., outputs...] matrix of factors a [.., in, r], b [.., r, out]."""
  nb = a.ndim - 1 - layout.inputs
  letters = _letters('', nb + layout.inputs + layout.outputs + 1)
  bt, ins = letters[:nb], letters[nb:nb + layout.inputs]
  outs, r = letters[nb + layout.inputs:-1], letters[-1]
  return jnp.einsum(f'{bt}{ins}{r},{bt}{r}{outs}->{bt}{ins}{outs}', a, b)


class CompressedWeight(nnx.Module):
  """Base: `w[...]` is the dense weight; `einsum` the product with it in a compute dtype."""
  layout: Layout

  def dense(self) -> jax.Array:  # every subclass defines it
    raise NotImplementedError(f'{type(self).__name__} does not define dense()')

  def __getitem__(self, key) -> jax.Array:
    return self.dense()[key]

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(equation, x, self.dense().astype(dtype))

  # Hooks for weights read whole rather than through `einsum` (the MoE layer's routed experts,
  # which its grouped matmul multiplies; effjax.models.moe calls them by duck typing).

  def int8_operands(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(int8 values, float32 scales, the input's static scale) of a calibrated W8A8 weight, for
    an int8 x int8 product; None for every other weight."""
    return None

  def observe_input(self, x: jax.Array) -> None:
    """Calibration: report max|x| of this weight's input (only ObservedWeight does)."""


class QuantizedWeight(CompressedWeight):
  """A weight stored as int8 / int4 / float8 values and float32 scales (qwix's quantization).

  `qvalue` has the weight's shape; `scale` has it too, with the input axes reduced to 1 (per
  channel) or to the number of groups (int4). The dense weight is formed in the jitted step from
  these (XLA fuses the conversion into the consumer); no full-precision copy is kept. W8A8
  weights also hold `act_scale`, the static per-tensor scale of their input calibrated on
  held-out batches: their product quantizes the activation to int8 and multiplies int8 by int8.
  """

  def __init__(self, qvalue, scale, layout: Layout, kind: str, act_scale=None, *,
               backend: str = 'auto', interpret: bool = False, fuse: bool = True,
               gemv: bool = False):
    self.layout, self.kind = layout, kind
    self.qvalue = qvalue
    self.scale = scale
    self.act_scale = act_scale
    # The weight-only matmul's backend (compress.qmm_backend; effjax/kernels/quantized_matmul),
    # whether products sharing x may run as one launch (compress.qmm_fuse; einsum_group) and
    # whether a single row takes the GEMV kernels (compress.qmm_gemv names this kind).
    self.backend, self.interpret, self.fuse, self.gemv = backend, interpret, fuse, gemv
    # Decoding's transposed storage (`store_output_major`, infer.qmm_output_major).
    self.output_major = False

  def store_output_major(self) -> None:
    """Store qvalue and scale [batch..., outputs..., inputs...] (int4 stays packed along its
    last input axis, now the minor one), in place: a single row's product then takes the
    output-major GEMV kernels. For decoding only; `qarray` / `w[...]` give the usual values."""
    if self.output_major or self.kind not in qmm.KINDS:
      return
    for key in ('qvalue', 'scale'):
      param = getattr(self, key)
      names = _names(param)
      order = _output_major_order(self.layout, len(names), to_stored=True)
      setattr(self, key, _param(jnp.transpose(param[...], order), tuple(names[i] for i in order)))
    self.output_major = True

  def _stored_arrays(self) -> tuple[jax.Array, jax.Array]:
    """(qvalue, scale) in the usual [batch..., inputs..., outputs...] layout."""
    qvalue, scale = self.qvalue[...], self.scale[...]
    if self.output_major:
      order = _output_major_order(self.layout, qvalue.ndim, to_stored=False)
      qvalue, scale = jnp.transpose(qvalue, order), jnp.transpose(scale, order)
    return qvalue, scale

  def qarray(self, dtype=jnp.float32):
    qvalue, scale = self._stored_arrays()
    return q_lib.as_qarray(qvalue, scale.astype(dtype), self.kind, self.layout)

  def dense(self) -> jax.Array:
    return q_lib.dequantize(self.qarray())

  def int8_operands(self):
    if self.kind == 'w8a8' and self.act_scale is not None:
      return self.qvalue[...], self.scale[...].astype(jnp.float32), self.act_scale[...]
    return None

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    if self.kind == 'w8a8' and self.act_scale is not None:
      return q_lib.w8a8_einsum(equation, x, self.act_scale[...], self.qvalue[...],
                               self.scale[...], self.layout).astype(dtype)
    if self.kind in qmm.KINDS:
      y = self._matmul(equation, x, dtype)
      if y is not None:
        return y
    return q_lib.einsum(equation, x, self.qarray(dtype)).astype(dtype)

  def plain_operands(self, equation: str, x: jax.Array):
    """(lead shape, K, qvalue [K or K/2, N], scale [rows, N], output shape) when the einsum is a
    plain projection (x's trailing axes are the weight's input axes, in order; the output is x's
    other axes then the weight's output axes); None for any other form. The weight's input axes
    flatten to one K axis (wo's heads x head_dim) and its outputs to one N axis, which is a
    reshape of the stored arrays: int4 is packed and grouped along the last input axis, so K's
    pairs and groups stay consecutive."""
    qvalue, scale = self.qvalue[...], self.scale[...]
    parts = _split_equation(equation, self.layout, qvalue.ndim)
    if parts is None:
      return None
    lhs, ins, outs, out = parts
    free = lhs[:len(lhs) - len(ins)]
    if not lhs.endswith(ins) or out != free + outs or len(set(lhs + outs)) != len(lhs + outs):
      return None
    n_in = len(ins)
    if self.output_major:  # stored [outputs..., inputs...]: returned as [N, K or K/2], [N, rows]
      out_shape, in_shape = qvalue.shape[:len(outs)], qvalue.shape[len(outs):]
    else:
      in_shape, out_shape = qvalue.shape[:n_in], qvalue.shape[n_in:]
    k, n = math.prod(x.shape[len(free):]), math.prod(out_shape)
    rows = math.prod(in_shape)  # int4: K / 2 bytes
    if rows * (1 if self.kind == 'int8' else 2) != k:
      return None
    if self.output_major:
      return x.shape[:len(free)], k, qvalue.reshape(n, rows), scale.reshape(n, -1), out_shape
    return x.shape[:len(free)], k, qvalue.reshape(rows, n), scale.reshape(-1, n), out_shape

  def _matmul(self, equation: str, x: jax.Array, dtype) -> jax.Array | None:
    """The product through effjax.kernels.quantized_matmul (None if not a plain projection)."""
    ys = _kernel_products([(equation, self)], x, dtype)
    return None if ys is None else ys[0]

  @staticmethod
  def einsum_group(products, x: jax.Array, dtype) -> list[jax.Array] | None:
    """[x times each weight] for products = [(equation, weight), ...] sharing x, as one
    quantized_matmul_many call (one kernel launch on GPU) when every weight is an int8 (or every
    one an int4 with one group size) weight-only QuantizedWeight on one backend that allows
    fusing and every equation is a plain projection; None otherwise (the caller then multiplies
    them one by one)."""
    weights = [w for _, w in products]
    first = weights[0]
    if not all(isinstance(w, QuantizedWeight) for w in weights):
      return None
    if first.kind not in qmm.KINDS or not all(
        w.fuse and (w.kind, w.backend, w.interpret, w.gemv, w.output_major) == (
            first.kind, first.backend, first.interpret, first.gemv, first.output_major)
        for w in weights):
      return None
    return _kernel_products(products, x, dtype)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
  if message not in _SAID:
    _SAID.add(message)
    logging.warning(message)


def _kernel_products(products, x: jax.Array, dtype) -> list[jax.Array] | None:
  """QuantizedWeight products sharing x through one quantized_matmul_many (None if any is not a
  plain projection, or they disagree on K or the int4 group)."""
  operands = [w.plain_operands(equation, x) for equation, w in products]
  if any(o is None for o in operands) or len({(o[0], o[1]) for o in operands}) != 1:
    return None
  first = products[0][1]
  major = first.output_major  # operands [N, K or K/2] and scales [N, rows]
  if len({o[3].shape[1 if major else 0] for o in operands}) != 1:  # int4 groups differ
    return None
  lead, k = operands[0][0], operands[0][1]
  # Output-major weights skip this: their GEMV kernel takes any N and an even K, and
  # `quantized_matmul_many` sends what it cannot take (an odd K, more rows) through XLA.
  if not major and (first.backend == 'triton' or (first.backend == 'auto' and len(products) > 1)):
    # compress.qmm_backend='triton' puts every product the kernel can tile on it; a projection
    # it cannot (GLA's 4-wide gate, Mamba-1's dt projections) takes XLA's product, said once.
    # A group the kernel cannot tile as a whole keeps one launch for the weights it can tile
    # (Mamba-1's B and C) and multiplies the others on their own, under 'auto' too: one
    # untileable weight (dt_low) does not send the others of its launch to XLA as well.
    group = None if first.kind == 'int8' else k // operands[0][3].shape[0]
    gemv = first.gemv and math.prod(lead) == 1  # the one-row kernels' wider rules apply
    reason = qmm.kernel_unsupported(first.kind, k, [o[2].shape[1] for o in operands], group,
                                    gemv=gemv)
    if reason:
      if first.backend == 'triton' and len(products) == 1:
        _say_once(f"compress.qmm_backend='triton': the quantized matmul kernel cannot tile a "
                  f"{first.kind} product ({reason}); that product runs through XLA")
      if len(products) == 1:
        return None
      tileable = [not qmm.kernel_unsupported(first.kind, k, o[2].shape[1], group, gemv=gemv)
                  for o in operands]
      if sum(tileable) < 2:
        return None  # nothing left to share a launch: the caller multiplies them one by one
      fused = iter(_kernel_products([p for p, t in zip(products, tileable) if t], x, dtype))
      return [next(fused) if t else w.einsum(equation, x, dtype)
              for (equation, w), t in zip(products, tileable)]
  compute = jnp.promote_types(x.dtype, dtype)
  ys = qmm.quantized_matmul_many(x.reshape(*lead, k).astype(compute),
                                 [(o[2], o[3]) for o in operands], kind=first.kind,
                                 backend=first.backend, interpret=first.interpret,
                                 gemv=first.gemv, output_major=major)
  return [y.reshape(*lead, *o[4]).astype(dtype) for y, o in zip(ys, operands)]


class FakeQuantWeight(CompressedWeight):
  """Quantization-aware training: the forward sees quantize-dequantize(w), gradients pass straight
  through to the float weight (the straight-through estimator; scales are w's absmax, so nothing
  is clipped and the gradient is the identity's)."""

  def __init__(self, value, layout: Layout, kind: str, group: int):
    self.layout, self.kind, self.group = layout, kind, group
    self.value = value

  def dense(self) -> jax.Array:
    w = self.value[...]
    return q_lib.fake_quant(w, self.layout, self.kind, self.group)


class LowRankWeight(CompressedWeight):
  """w ~ u @ v with u [inputs, rank] and v [rank, outputs] from a truncated SVD."""

  def __init__(self, u, v, layout: Layout):
    self.layout = layout
    self.u, self.v = u, v

  def dense(self) -> jax.Array:
    return _product(self.u[...], self.v[...], self.layout)

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    y = factored_einsum(equation, x, self.u[...].astype(dtype), self.v[...].astype(dtype),
                        self.layout)
    return super().einsum(equation, x, dtype) if y is None else y


class LoRAWeight(CompressedWeight):
  """A frozen base weight plus a trainable low-rank update: w = base + (alpha / r) a @ b.

  b starts at zero, so the adapted model starts equal to the base model. The base is a Param (in
  the source's dtype or compress.lora_base_dtype's float) or, with lora_base_dtype 'int8' /
  'int4', a QuantizedWeight (weight-only, quantized as post-training quantization does it: the
  QLoRA recipe, with int8 / int4 in place of NF4): the frozen bytes shrink 4x / about 7x from
  float32, and its products go through the quantized matmul's paths, gradients to x included.
  """

  def __init__(self, base, lora_a, lora_b, layout: Layout, scale: float):
    self.layout, self.scale = layout, scale
    self.base, self.lora_a, self.lora_b = base, lora_a, lora_b

  def delta(self) -> jax.Array:
    return self.scale * _product(self.lora_a[...], self.lora_b[...], self.layout)

  def base_value(self) -> jax.Array:
    """The base weight as an array (a quantized base dequantized, in float32)."""
    return self.base.dense() if isinstance(self.base, CompressedWeight) else self.base[...]

  def dense(self) -> jax.Array:
    # In the adapters' dtype (float32) when the base is stored narrower (compress.lora_base_dtype):
    # the merged model is the dense model of the source's parameter dtype.
    base = self.base_value()
    dtype = jnp.promote_types(base.dtype, self.lora_a[...].dtype)
    return base.astype(dtype) + self.delta().astype(dtype)

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    low = factored_einsum(equation, x, self.lora_a[...].astype(dtype),
                          self.lora_b[...].astype(dtype), self.layout)
    if low is None:
      return super().einsum(equation, x, dtype)
    if isinstance(self.base, CompressedWeight):
      y = self.base.einsum(equation, x, dtype)
    else:
      y = jnp.einsum(equation, x, self.base[...].astype(dtype))
    return y + (self.scale * low).astype(y.dtype)

  @staticmethod
  def einsum_group(products, x: jax.Array, dtype) -> list[jax.Array] | None:
    """[x times each weight] for LoRA weights sharing x whose quantized bases can share one
    kernel launch (QuantizedWeight.einsum_group: attention's q/k/v, SwiGLU's gate/up of a QLoRA
    model); each adapter's low-rank product is added after. None where that does not apply (the
    caller then multiplies them one by one)."""
    weights = [w for _, w in products]
    if not all(isinstance(w, LoRAWeight) for w in weights):
      return None
    ys = QuantizedWeight.einsum_group([(equation, w.base) for equation, w in products], x, dtype)
    if ys is None:
      return None
    lows = [factored_einsum(equation, x, w.lora_a[...].astype(dtype),
                            w.lora_b[...].astype(dtype), w.layout) for equation, w in products]
    if any(low is None for low in lows):
      return None
    return [y + (w.scale * low).astype(y.dtype) for y, w, low in zip(ys, weights, lows)]


class ObservedWeight(CompressedWeight):
  """Calibration only: a dense weight whose product reports max|input| per layer to the host."""

  def __init__(self, value, layout: Layout, key: str, layer, sink: Callable):
    self.layout, self.key, self.sink = layout, key, sink
    self.value = value
    self.layer = layer  # [layers] int32 under the scan: which layer a product belongs to

  def dense(self) -> jax.Array:
    return self.value[...]

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    self.observe_input(x)
    return super().einsum(equation, x, dtype)

  def observe_input(self, x: jax.Array) -> None:
    jax.debug.callback(self.sink, self.key, self.layer[...], jnp.max(jnp.abs(x)))


def _output_major_order(layout: Layout, ndim: int, to_stored: bool) -> tuple[int, ...]:
  """The transpose [batch, inputs, outputs] -> [batch, outputs, inputs] (or back)."""
  batch = ndim - layout.inputs - layout.outputs
  first = layout.inputs if to_stored else layout.outputs
  return (tuple(range(batch)) + tuple(range(batch + first, ndim)) +
          tuple(range(batch, batch + first)))


class OutputMajorWeight(CompressedWeight):
  """A dense weight stored with its output axes before its input axes, for decoding.

  The same values as the Param it replaces, transposed once: [batch..., outputs..., inputs...].
  A one-row product then reduces along the stored array's minor axes. On GPU this matters for
  attention's out projection (wo [heads, head_dim, embed]): XLA turns a one-row product this
  small into an elementwise multiply and a reduction, and reducing over the major axes of the
  [heads, head_dim, embed] layout runs at a fraction of the bandwidth that the row reduction over
  the transposed layout reaches. Training keeps the usual layout; `output_major` swaps these in
  for decoding only.

  `kernel` ('' by default; 'triton' on a GPU, 'interpret' in tests; set by `output_major`'s
  `kernel`, infer.output_major_kernel): a product of a single row takes the Pallas GEMV kernel
  (effjax/kernels/gemv) instead of XLA's reduction; other products, and shapes the kernel's
  tiles cannot divide, keep the einsum.
  """

  def __init__(self, value, layout: Layout, kernel: str = ''):
    self.layout = layout
    self.value = value
    self.kernel = kernel

  def dense(self) -> jax.Array:
    w = self.value[...]
    return jnp.transpose(w, _output_major_order(self.layout, w.ndim, to_stored=False))

  def einsum(self, equation: str, x: jax.Array, dtype) -> jax.Array:
    w = self.value[...]
    parts = _split_equation(equation, self.layout, w.ndim)
    if parts is None:
      return super().einsum(equation, x, dtype)
    lhs, ins, outs, out = parts
    if self.kernel:
      y = self._gemv(lhs, ins, outs, out, x, w, dtype)
      if y is not None:
        return y
    return jnp.einsum(f'{lhs},{outs}{ins}->{out}', x, w.astype(dtype))

  def _gemv(self, lhs, ins, outs, out, x, w, dtype):
    """The one-row product through the GEMV kernel, or None where it does not apply (more than
    one row, an einsum whose output does not list x's other axes then the outputs in order, a
    shape no tiling divides, or a mesh in context that partitions arrays automatically: the
    kernel is one custom call XLA cannot split)."""
    from effjax.kernels import gemv
    from effjax.kernels._compat import partitioned_mesh
    if partitioned_mesh():
      return None
    keep = lhs[:len(lhs) - len(ins)]
    if not lhs.endswith(ins) or out != keep + outs:
      return None
    k = math.prod(x.shape[len(keep):])
    n = math.prod(w.shape[:len(outs)])
    if x.size != k or gemv.default_tiling(k, n) is None:
      return None
    x_row = x.astype(dtype).reshape(1, k)
    y = gemv.gemv_nk(x_row, w.astype(dtype).reshape(n, k), backend=self.kernel)
    return y.reshape(x.shape[:len(keep)] + w.shape[:len(outs)])


# ------------------------------------------------------------------ swapping weights in a model

def path_key(path) -> str:
  """('groups', 'blocks', 0, 'mixer', 'wq') -> 'groups.blocks.0.mixer.wq'."""
  return '.'.join(str(p) for p in path)


def target_names(compress_cfg) -> tuple[str, ...]:
  return parse_names(compress_cfg.targets)


def find_targets(model: nnx.Module, names: tuple[str, ...]) -> list[tuple[tuple, nnx.Module, str]]:
  """(module path, module, attribute) of every plain Param named in `names`, model order."""
  found = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, CompressedWeight):
      continue
    for name in names:
      value = vars(module).get(name)
      if isinstance(value, nnx.Param) and not isinstance(value, CompressedWeight):
        found.append((tuple(path), module, name))
  return found


def parse_ranks(spec: str) -> dict[str, int]:
  """'wq=12,w_up=40' -> {'wq': 12, 'w_up': 40}."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(','))):
    name, _, value = item.partition('=')
    out[name.strip()] = int(value)
  return out


def _names(param: nnx.Param) -> tuple:
  names = param.get_metadata().get('out_sharding')
  return tuple(names) if names else (None,) * param[...].ndim


def compress_param(param: nnx.Param, name: str, method: str, cfg, *, rngs: nnx.Rngs | None = None,
                   act_amax: jax.Array | None = None) -> CompressedWeight:
  """One Param -> its compressed stand-in per `method` (values quantized / factored / wrapped)."""
  names = _names(param)
  layout = layout_of(names)
  w = param[...]
  batch_names = names[:layout.batch]
  in_names = names[layout.batch:layout.batch + layout.inputs]
  out_names = names[layout.batch + layout.inputs:]
  if method in QUANT_METHODS:
    qvalue, scale = q_lib.quantize_weight(w, layout, method, cfg.int4_group_size)
    act = None
    if method == 'w8a8':
      layers = w.shape[:1] if batch_names[:1] == ('layers',) else ()
      amax = jnp.ones(layers, jnp.float32) * 127.0 if act_amax is None else act_amax
      act = _param(q_lib.static_scale(amax), batch_names[:len(layers)])
    # The scales keep the weight's axis names where they keep its size (layers, outputs); the
    # reduced input axes (1 per channel, or int4's groups) are replicated, so a mesh that shards
    # the weight's inputs (w_down's 'mlp' over 'tensor') can still place them.
    scale_names = tuple(n if scale.shape[i] == w.shape[i] else None for i, n in enumerate(names))
    return QuantizedWeight(_param(qvalue, names), _param(scale, scale_names), layout, method, act,
                           backend=cfg.get('qmm_backend', 'auto'),
                           interpret=bool(cfg.get('qmm_interpret', False)),
                           fuse=bool(cfg.get('qmm_fuse', True)),
                           gemv=method in parse_names(cfg.get('qmm_gemv', '')))
  if method in QAT_METHODS:
    return FakeQuantWeight(_param(w, names), layout, method[len('qat_'):], cfg.int4_group_size)
  if method == 'lowrank':
    rank = parse_ranks(cfg.lowrank_ranks).get(name)
    if not rank:
      raise ValueError(f'compress.lowrank_ranks={cfg.lowrank_ranks!r} gives no rank for {name}')
    from effjax.compress import lowrank
    u, v = lowrank.factor(w, layout, rank)
    return LowRankWeight(_param(u.astype(w.dtype), batch_names + in_names + (None,)),
                         _param(v.astype(w.dtype), batch_names + (None,) + out_names), layout)
  if method == 'lora':
    r = cfg.lora_rank
    rngs = rngs or nnx.Rngs(0)
    in_shape = w.shape[:layout.batch + layout.inputs]
    fan_in = math.prod(w.shape[layout.batch:layout.batch + layout.inputs])
    a = jax.random.normal(rngs.params(), in_shape + (r,), jnp.float32) / math.sqrt(fan_in)
    b = jnp.zeros(w.shape[:layout.batch] + (r,) + w.shape[layout.batch + layout.inputs:],
                  jnp.float32)
    base_dtype = cfg.get('lora_base_dtype') or ''
    if base_dtype in LORA_QUANTIZED_BASES:  # QLoRA-style: the frozen base weight-only quantized
      base = compress_param(param, name, base_dtype, cfg)
    else:
      base = _param(w.astype(base_dtype) if base_dtype else w, names)
    return LoRAWeight(base, _param(a, batch_names + in_names + (None,)),
                      _param(b, batch_names + (None,) + out_names), layout,
                      cfg.lora_alpha / r)
  raise ValueError(f'compress.method={method!r} does not change weights')


def restructure(model: nnx.Module, config, *, act_amax: dict[str, jax.Array] | None = None,
                method: str | None = None) -> nnx.Module:
  """The model with its target projections swapped per config.compress (in place; returned).

  Methods that keep the parameter tree (pruning, distillation, none) return the model unchanged.
  `act_amax` ({path key: per-layer max|x|}) is the W8A8 calibration.
  """
  cfg = config.compress
  method = cfg.method if method is None else method
  if method not in STRUCTURAL:
    return model
  rngs = nnx.Rngs(config.seed + 1)
  for path, module, name in find_targets(model, target_names(cfg)):
    key = path_key(path + (name,))
    amax = None if act_amax is None else act_amax.get(key)
    setattr(module, name, compress_param(vars(module)[name], name, method, cfg, rngs=rngs,
                                         act_amax=amax))
  if method == 'lora' and cfg.get('lora_vocab_dtype'):
    # The frozen vocabulary matrices (input embedding, output head, exit heads' projections)
    # stored narrower: both are read in the compute dtype (bf16 on GPU), so the forward pass
    # there computes the same values; a 1B model's untied pair drops from 0.82 to 0.41 GB.
    _narrow_vocab_matrices(model, jnp.dtype(cfg.lora_vocab_dtype))
  return model


def _vocab_matrices(model: nnx.Module):
  """(module, attribute, Param) of every plain float Param with a 'vocab' axis."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, CompressedWeight):
      continue
    for name, value in list(vars(module).items()):
      if (isinstance(value, nnx.Param) and not isinstance(value, CompressedWeight) and
          'vocab' in _names(value) and jnp.issubdtype(value[...].dtype, jnp.floating)):
        yield module, name, value  # an nnx.List's items too (exit heads' projections)


def _narrow_vocab_matrices(model: nnx.Module, dtype) -> None:
  for owner, key, param in list(_vocab_matrices(model)):
    if jnp.dtype(param[...].dtype).itemsize > jnp.dtype(dtype).itemsize:
      setattr(owner, key, _param(param[...].astype(dtype), _names(param)))


# What decoding stores output-major unless told otherwise (infer.output_major's default):
# attention's out projection, whose one-row product XLA on GPU otherwise computes as a reduction
# over the weight's major axes, at a fraction of the bandwidth.
DECODE_OUTPUT_MAJOR = ('wo',)
_READ_WHOLE = {'experts', 'vocab'}  # axes of weights used whole, never through layers.matmul


def output_major(model: nnx.Module, names: tuple[str, ...], *,
                 quantized: tuple[str, ...] = (), kernel: str = '') -> nnx.Module:
  """The plain Params called `names` stored output-major (OutputMajorWeight), in place; returned.

  For decoding (effjax.infer.engine.Engine, effjax.bench.decode.time_decode): the products
  compute the same values. Compressed weights (quantized, low-rank, LoRA) are left as they are,
  except that `quantized` (infer.qmm_output_major: kinds, 'int8' / 'int4') stores every
  weight-only QuantizedWeight of those kinds computed through `layers.matmul` output-major as
  well, whatever its name
  (`QuantizedWeight.store_output_major`; those read whole, the MoE experts', are left).
  `kernel` ('', 'triton', 'interpret'; infer.output_major_kernel): the float weights' one-row
  products through the Pallas GEMV kernel (OutputMajorWeight.kernel).
  Only weights whose products go through `layers.matmul` belong here (a weight read whole with
  `w[...]`, as the MoE experts' are, would be transposed back on every read): naming one is an
  error, and so is a name other than the default's that matches no weight of the model (a
  misspelt name would otherwise do nothing). The default may match nothing (a model of
  state-space layers has no `wo`).
  """
  from effjax.kernels import gemv
  if kernel not in ('', *gemv.BACKENDS):
    raise ValueError(f'output-major GEMV kernel {kernel!r}: allowed \'\' (none), '
                     f'{", ".join(gemv.BACKENDS)}')
  found = find_targets(model, names)
  unmatched = set(names) - {name for _, _, name in found} - set(DECODE_OUTPUT_MAJOR)
  if unmatched:
    known = sorted({name for _, module in nnx.iter_modules(model)
                    for name, value in vars(module).items()
                    if isinstance(value, nnx.Param) and not isinstance(value, CompressedWeight)
                    and value[...].ndim >= 2 and not set(_names(value)) & _READ_WHOLE})
    raise ValueError(f'infer.output_major: no weight called {", ".join(sorted(unmatched))} in '
                     f'this model; its projection weights are: {", ".join(known)}')
  whole = sorted({name for _, module, name in found
                  if set(_names(vars(module)[name])) & _READ_WHOLE})
  if whole:
    raise ValueError(f'infer.output_major: {", ".join(whole)} are read whole (the embedding, the '
                     'output head, the MoE experts); only projections computed with '
                     "layers.matmul (attention's 'wo', ...) can be stored output-major")
  for _, module, name in found:
    param = vars(module)[name]
    names_in = _names(param)
    layout = layout_of(names_in)
    order = _output_major_order(layout, len(names_in), to_stored=True)
    value = jnp.transpose(param[...], order)
    setattr(module, name, OutputMajorWeight(_param(value, tuple(names_in[i] for i in order)),
                                            layout, kernel))
  if quantized:
    unknown = sorted(set(quantized) - set(qmm.KINDS))
    if unknown:
      raise ValueError(f'infer.qmm_output_major: {", ".join(unknown)} is no weight-only quantized '
                       f'kind; allowed: {", ".join(qmm.KINDS)}')
    for _, module in nnx.iter_modules(model):
      if (isinstance(module, QuantizedWeight) and module.kind in quantized
          and not set(module.layout.names) & _READ_WHOLE):
        module.store_output_major()
  return model


def gemv_kernel(on: bool) -> str:
  """`output_major`'s kernel for infer.output_major_kernel: 'triton' on a GPU when on, else ''
  (XLA's reduction: the kernel compiles for GPUs only)."""
  return 'triton' if on and jax.default_backend() == 'gpu' else ''


def parse_names(spec: str) -> tuple[str, ...]:
  """'wo, w_out' -> ('wo', 'w_out')."""
  return tuple(n.strip() for n in spec.split(',') if n.strip())


def observe(model: nnx.Module, names: tuple[str, ...], sink: Callable) -> nnx.Module:
  """Wrap the target projections so each product reports its input's max|x| to sink."""
  for path, module, name in find_targets(model, names):
    param = vars(module)[name]
    layout = layout_of(_names(param))
    stacked = _names(param)[:1] == ('layers',)
    layer = jnp.arange(param[...].shape[0], dtype=jnp.int32) if stacked else jnp.zeros((),
                                                                                      jnp.int32)
    setattr(module, name, ObservedWeight(param, layout, path_key(path + (name,)),
                                         _param(layer, ('layers',) if stacked else ()), sink))
  return model


def densify(model: nnx.Module) -> nnx.Module:
  """Every compressed weight replaced by a plain Param of its dense value (LoRA merged, low-rank
  multiplied out, fake quantization dropped; quantized weights dequantized), in place."""
  for _, module in list(nnx.iter_modules(model)):
    for name, value in list(vars(module).items()):
      if isinstance(value, CompressedWeight):
        ref = {QuantizedWeight: 'qvalue', FakeQuantWeight: 'value', LowRankWeight: 'u',
               LoRAWeight: 'base', ObservedWeight: 'value',
               OutputMajorWeight: 'value'}[type(value)]
        like = vars(value)[ref]
        dtype = value.scale[...].dtype if isinstance(value, QuantizedWeight) else None
        dense = value.value[...] if isinstance(value, FakeQuantWeight) else value.dense()
        if dtype is not None:
          dense = dense.astype(dtype)
        elif isinstance(value, LowRankWeight):
          dense = dense.astype(like[...].dtype)
        setattr(module, name, _param(dense, value.layout.names))
  precision = getattr(model, 'precision', None)
  if precision is not None:  # vocabulary matrices a LoRA model stored narrower, back as trained
    for owner, key, param in list(_vocab_matrices(model)):
      if param[...].dtype != precision.param:
        setattr(owner, key, _param(param[...].astype(precision.param), _names(param)))
  return model


def trainable_fn(config) -> Callable[[tuple, Any], bool] | None:
  """(path names, leaf) -> whether the train step differentiates and updates it; None = all.

  LoRA trains only its adapters. Otherwise integer leaves (quantized values) and the scales of
  quantized weights stay fixed; everything else trains.
  """
  method = config.compress.method
  if method == 'lora':
    return lambda names, leaf: bool({'lora_a', 'lora_b'} & set(names))
  if method in QUANT_METHODS:
    return lambda names, leaf: (jnp.issubdtype(leaf.dtype, jnp.floating) and not
                                ({'qvalue'} | QUANT_SCALE_NAMES) & set(names))
  return None
