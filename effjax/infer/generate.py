"""Sampling from a trained model: temperature and top-k, with or without a key/value cache.

`generate_tokens` recomputes the whole context for each new token inside one jitted loop
(compiled once per prompt length and budget): O(T^2) work per token, but it needs nothing of the
mixers beyond their forward pass, so it is the reference. `generate_tokens_cached` runs the prompt
once (prefill), then one jitted loop of single-token decode steps against each layer's key/value
cache (effjax.models.lm.LM.decode). Both draw from the same key sequence, so they return the same
tokens; `generate_text` uses the cached one.

`Decoder` is the decoding engine's API (effjax/infer/engine.py): a batch of prompts of any
lengths (left-padded to a multiple of 16 tokens, so few lengths compile), greedy / temperature /
top-k / top-p sampling with a seed, stop tokens, a token budget, and the method: 'plain',
'early_exit' (exit_decode.py), 'self_speculative' or 'speculative' (speculative.py). Each
(method, batch, padded length) compiles once into one jitted program: prefill, then a
`lax.while_loop` that ends when every sequence has stopped or the budget is spent; the cache is
created inside it and never leaves the device, so there is no host round trip per token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effjax.compress import weights as w_lib
from effjax.infer import exit_decode, speculative
from effjax.infer.engine import Engine
from effjax.infer.exit_decode import ExitPolicy
from effjax.infer.sampling import Sampler

METHODS = ('plain', 'early_exit', 'self_speculative', 'speculative')


def sample_logits(logits_v: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  logits_v = logits_v.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits_v, axis=-1)
  logits_v = logits_v / temperature
  if top_k and top_k < logits_v.shape[-1]:
    kth = jax.lax.top_k(logits_v, top_k)[0][..., -1:]
    logits_v = jnp.where(logits_v < kth, -jnp.inf, logits_v)
  return jax.random.categorical(key, logits_v, axis=-1)


def generate_tokens(graphdef: Any, params: Any, prompt_ids: list[int], max_new_tokens: int, *,
                    temperature: float, top_k: int, seed: int, vocab_limit: int) -> list[int]:
  """Continue `prompt_ids` by max_new_tokens sampled tokens; ids >= vocab_limit are never drawn."""
  total = len(prompt_ids) + max_new_tokens
  buffer = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids))

  @jax.jit
  def run(params, buffer, key):
    model = nnx.merge(graphdef, params)

    def body(pos, carry):
      buf, key = carry
      key, sub = jax.random.split(key)
      logits = model(buf)[0, pos - 1]
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
      token = sample_logits(logits, sub, temperature, top_k)
      return buf.at[0, pos].set(token.astype(jnp.int32)), key

    buf, _ = jax.lax.fori_loop(len(prompt_ids), total, body, (buffer, key))
    return buf

  out = jax.device_get(run(params, buffer, jax.random.key(seed)))
  return [int(t) for t in out[0, len(prompt_ids):]]


def generate_tokens_cached(graphdef: Any, params: Any, prompt_ids: list[int], max_new_tokens: int,
                           *, temperature: float, top_k: int, seed: int,
                           vocab_limit: int) -> list[int]:
  """generate_tokens through the key/value cache: one prefill, then one decode step per token."""
  prompt_len = len(prompt_ids)
  total = prompt_len + max_new_tokens
  prompt = jnp.asarray(prompt_ids, jnp.int32)[None]

  @jax.jit
  def run(params, prompt, key):
    model = nnx.merge(graphdef, params)

    def draw(logits_v, key):
      logits_v = jnp.where(jnp.arange(logits_v.shape[-1]) < vocab_limit, logits_v, -jnp.inf)
      key, sub = jax.random.split(key)
      return sample_logits(logits_v, sub, temperature, top_k).astype(jnp.int32), key

    logits, cache = model.prefill(prompt, model.init_cache(1, total))
    token, key = draw(logits[0, -1], key)
    buf = jnp.zeros((total,), jnp.int32).at[:prompt_len].set(prompt[0]).at[prompt_len].set(token)

    def body(pos, carry):  # the token at pos from the logits after the token at pos - 1
      buf, cache, key = carry
      logits, cache = model.decode(buf[pos - 1][None], pos - 1, cache)
      token, key = draw(logits[0], key)
      return buf.at[pos].set(token), cache, key

    buf, _, _ = jax.lax.fori_loop(prompt_len + 1, total, body, (buf, cache, key))
    return buf

  out = jax.device_get(run(params, prompt, jax.random.key(seed)))
  return [int(t) for t in out[prompt_len:]]


def generate_text(graphdef: Any, params: Any, tokenizer, prompt: str, max_new_tokens: int, *,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0,
                  cached: bool = True) -> str:
  """Prompt text -> prompt + continuation, cut at the first end-of-document token.

  cached=False recomputes the full context per token (the reference path), as does a model
  with a mixer that has no cached decoding.
  """
  prompt_ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  cached = cached and nnx.merge(graphdef, params).supports_cache()
  generate = generate_tokens_cached if cached else generate_tokens
  new = generate(graphdef, params, prompt_ids, max_new_tokens, temperature=temperature,
                 top_k=top_k, seed=seed, vocab_limit=tokenizer.vocab_size)
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return prompt + tokenizer.decode(new)


# ---------------------------------------------------------------- the decoding engine's API

@dataclasses.dataclass(frozen=True)
class Options:
  """How `Decoder` decodes (the fields of config.generate and config.infer, see configs/base.py)."""
  method: str = 'plain'
  max_new_tokens: int = 64
  sampler: Sampler = Sampler()
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  max_len: int = 0  # cache positions; 0 = padded prompt + max_new_tokens + gamma + 1
  weights_dtype: str = ''
  attention_kernel: str = 'auto'  # effjax.kernels.decode_attention's backend
  attention_interpret: bool = False  # the kernel in interpret mode (tests on CPU)
  output_major: tuple[str, ...] = w_lib.DECODE_OUTPUT_MAJOR  # stored transposed for decoding
  qmm_output_major: tuple[str, ...] = ()  # quantized kinds stored transposed for decoding
  cache_write_in_kernel: bool = True  # the decode-attention kernel rotates and writes the new keys
  output_major_kernel: str = ''  # output-major float weights' one-row products: GEMV kernel
  fold_norms: bool = False  # RMSNorm gains folded into the weights they feed (the engine)
  attention_tiling: str = ''  # the decode-attention kernel's tiling ('' = its default)
  exit_policy: ExitPolicy = ExitPolicy()
  gamma: int = 4
  draft_exit: int = 0  # self_speculative: the exit layer that drafts (0 = the first exit)
  bucket: int = 16  # prompts are left-padded to a multiple of this many tokens


@dataclasses.dataclass
class Result:
  tokens: list[list[int]]  # each sequence's new tokens, cut after its first stop token
  stats: dict[str, Any]


def _token_loop(engine, a, tokens_bt, start_b, key, step_fn, *, max_new: int, max_len: int,
                sampler: Sampler, stop_ids, padded: bool, num_exits: int = 0):
  """Prefill, then one token per row per iteration; step_fn -> (tokens, exit index, caches)."""
  b, t = tokens_bt.shape
  caches = engine.init_cache(b, max_len)
  logits, _, caches = engine.prefill(a, tokens_bt, start_b, caches, padded)
  first = sampler.sample(logits, jax.random.fold_in(key, 0))
  stop = jnp.asarray(stop_ids, jnp.int32)
  buf = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
  hist = jnp.zeros((num_exits + 1,), jnp.int32)

  def cond(c):
    return (c[0] < max_new) & ~jnp.all(c[3])

  def body(c):
    i, last, caches, done, buf, hist = c
    token, where, caches = step_fn(last, t + i - 1, caches, jax.random.fold_in(key, i))
    live = ~done
    hist = hist + jnp.sum(jax.nn.one_hot(where, num_exits + 1, dtype=jnp.int32) *
                          live[:, None].astype(jnp.int32), axis=0)
    done = done | jnp.isin(token, stop)
    return i + 1, token, caches, done, buf.at[:, i].set(token), hist

  carry = (jnp.int32(1), first, caches, jnp.isin(first, stop), buf, hist)
  out = jax.lax.while_loop(cond, body, carry)
  return out[4], {'exit_histogram': out[5]}


class Decoder:
  """Batched generation from a trained model with one of METHODS; compiled once per shape."""

  def __init__(self, graphdef: Any, params: Any, options: Options, draft: tuple | None = None):
    if options.method not in METHODS:
      raise ValueError(f'infer.method={options.method!r}: allowed values are {", ".join(METHODS)}')
    self.options = options
    kernel = (options.attention_kernel, options.attention_interpret)
    vocab = options.sampler.vocab_limit  # the heads keep only the rows that can be drawn
    self.engine = Engine(graphdef, params, options.weights_dtype, *kernel, vocab_limit=vocab,
                         output_major=options.output_major,
                         qmm_output_major=options.qmm_output_major,
                         cache_write_in_kernel=options.cache_write_in_kernel,
                         output_major_kernel=options.output_major_kernel,
                         fold_norms=options.fold_norms,
                         attention_tiling=options.attention_tiling)
    exits = self.engine.exits
    if options.method in ('early_exit', 'self_speculative') and not exits:
      raise ValueError(f'infer.method={options.method}: the model has no exit heads; train it '
                       'with model.exit_layers set (e.g. --config.model.exit_layers=2)')
    self.exit_index = 0
    if options.method == 'self_speculative':
      layer = options.draft_exit or exits[0]
      if layer not in exits:
        raise ValueError(f'infer.draft_exit={options.draft_exit}: not an exit layer; the model '
                         f'exits after layers {", ".join(map(str, exits))}')
      self.exit_index = exits.index(layer)
    self.draft = None
    if options.method == 'speculative':
      if draft is None:
        raise ValueError('infer.method=speculative needs a draft model (infer.draft_config)')
      self.draft = Engine(*draft, options.weights_dtype, *kernel, vocab_limit=vocab,
                          output_major=options.output_major,
                          qmm_output_major=options.qmm_output_major,
                          cache_write_in_kernel=options.cache_write_in_kernel,
                          output_major_kernel=options.output_major_kernel,
                          fold_norms=options.fold_norms,
                          attention_tiling=options.attention_tiling)
      dv, tv = self.draft.cfg.vocab_size, self.engine.cfg.vocab_size
      if dv != tv:
        raise ValueError(f'the draft model\'s vocabulary ({dv} ids, model.vocab_size of '
                         f'infer.draft_config) differs from the target\'s ({tv}); speculative '
                         'decoding needs one vocabulary')
    self._compiled: dict[tuple, Any] = {}

  def cache_length(self, padded_len: int) -> int:
    o = self.options
    needed = padded_len + o.max_new_tokens + o.gamma + 1
    if o.max_len and needed > o.max_len:
      raise ValueError(f'a prompt of {padded_len} tokens (padded) + generate.max_new_tokens='
                       f'{o.max_new_tokens} (+ {o.gamma + 1} for drafts) does not fit the cache '
                       f'of infer.max_len={o.max_len}; shorten the prompt or raise infer.max_len')
    return o.max_len or needed

  def _program(self, batch: int, length: int, padded: bool):
    o, engine, draft = self.options, self.engine, self.draft
    max_len = self.cache_length(length)
    common = dict(max_new=o.max_new_tokens, max_len=max_len, sampler=o.sampler,
                  stop_ids=tuple(o.stop_tokens) or (-1,), padded=padded)

    def run(a, da, tokens, start, key):
      if o.method == 'plain':
        def step_fn(last, slot, caches, k):
          x, caches, _ = engine.run(a, 0, engine.num_layers, engine.embed(a, last[:, None]),
                                    slot, start, caches)
          return o.sampler.sample(engine.head(a, x)[:, 0], k), jnp.zeros_like(last), caches
        return _token_loop(engine, a, tokens, start, key, step_fn, **common)
      if o.method == 'early_exit':
        def step_fn(last, slot, caches, k):
          return exit_decode.step(engine, a, last, slot, start, caches, o.exit_policy, o.sampler,
                                  k)
        return _token_loop(engine, a, tokens, start, key, step_fn, num_exits=len(engine.exits),
                           **common)
      return speculative.run_loop(engine, a, tokens, start, key, gamma=o.gamma, draft=draft,
                                  da=da, exit_index=self.exit_index, **common)

    return jax.jit(run)

  def pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to a multiple of options.bucket: (tokens [B, T], start [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError('every prompt needs at least one token')
    longest = max(len(p) for p in prompts)
    length = -(-longest // self.options.bucket) * self.options.bucket
    tokens = np.zeros((len(prompts), length), np.int32)
    start = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, length - len(p):] = p
      start[i] = length - len(p)
    return tokens, start

  def compiled(self, prompts: Sequence[Sequence[int]]):
    """(the compiled program, its inputs, compile seconds) for this batch of prompts."""
    tokens, start = self.pad(prompts)
    padded = bool(start.any())
    shape = (tokens.shape, padded)
    key = jax.random.key(self.options.seed)
    da = self.draft.arrays if self.draft is not None else None
    args = (self.engine.arrays, da, jnp.asarray(tokens), jnp.asarray(start), key)
    seconds = 0.0
    if shape not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[shape] = self._program(*tokens.shape, padded).lower(*args).compile()
      seconds = time.perf_counter() - t0
    return self._compiled[shape], args, seconds

  def generate(self, prompts: Sequence[Sequence[int]]) -> Result:
    program, args, compile_s = self.compiled(prompts)
    t0 = time.perf_counter()
    buf, stats = jax.block_until_ready(program(*args))
    seconds = time.perf_counter() - t0
    buf = np.asarray(buf)[:, :self.options.max_new_tokens]
    stop = set(self.options.stop_tokens)
    tokens = []
    for row in buf.tolist():
      cut = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
      tokens.append(row[:cut])
    stats = {k: np.asarray(v).tolist() for k, v in stats.items()}
    stats.update(seconds=seconds, compile_seconds=compile_s,
                 new_tokens=sum(len(t) for t in tokens))
    if 'drafted' in stats and stats['drafted']:
      stats['acceptance_rate'] = stats['accepted'] / stats['drafted']
    return Result(tokens, stats)
