"""Inference from packed ternary weights: the exported form of a BitNet b1.58 model.

Papers: "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al.,
arXiv 2402.17764, Sec. 2: absmean ternary weights W~ = RoundClip(W/(gamma+eps), -1, 1) with one
gamma per tensor, absmax int8 activations per token) and "BitNet b1.58 2B4T Technical Report"
(arXiv 2504.12285; bitnet.cpp's I2_S format: 4 weights per byte, one per-tensor scale).

`export_packed_ternary(params, cfg)` turns every BitEinsum kernel of a trained `linear="bitlinear"`
model into the planar 2-bit layout of `effjax.quant.ternary` (`packed` uint8 [Kp/4, Np] and the
per-tensor `scale` gamma) and returns the config with `linear="ternary_packed"`; the model built from
that config uses `PackedTernaryEinsum` for every projection, which quantizes the activations to
int8 per token and calls `pallas_kernels.ternary_matmul.ternary_linear` (the Pallas kernels on GPU,
the plain-jnp reference elsewhere). The result equals the fake-quant BitEinsum forward up to float
rounding: both compute sum_k x~_k W~_k * s_x * gamma, the packed path with exact int32 sums.

The einsum's kernel must list its contracted axes first and x must end with them in the same order
(true of every projection in `effjax.layers.attention` / `mlp`): the kernel is flattened to
[K = prod(contracted), N = prod(rest)] and x to [M, K].

The `packed` param is the uint8 form [Kp/4, Np] (the default export) or the same bytes as int32
words [Kp/4, Np/4] (`export_packed_ternary(..., words=True)`); the layer reads whichever it is
given. The GPU kernels read words, and XLA converts a uint8 param with an extra pass over the weight
on every call, so decode should run from a words export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.quant.ternary import PackedTernary, export_ternary, padded_dims, words_2bit
from pallas_kernels.ternary_matmul import ternary_linear

__all__ = ["PackedTernaryEinsum", "export_packed_ternary", "PROJECTION_K_AXES", "split_eqn"]

# projection module name -> number of leading (contracted) kernel axes
PROJECTION_K_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate": 1, "up": 1,
                     "down": 1}


def split_eqn(eqn: str) -> tuple[str, str, str, str]:
  """("lead" x axes, contracted axes, kernel output axes, out) of "<lead+contr>,<contr+rest>->..."

  Raises ValueError unless x = lead + contracted, kernel = contracted + rest, out = lead + rest.
  """
  spec = eqn.replace(" ", "")
  lhs, out = spec.split("->")
  x_spec, w_spec = lhs.split(",")
  contracted = "".join(a for a in w_spec if a in x_spec and a not in out)
  nc = len(contracted)
  lead, rest = x_spec[:len(x_spec) - nc], w_spec[nc:]
  if (not nc or x_spec[len(x_spec) - nc:] != contracted or w_spec[:nc] != contracted
      or out != lead + rest):
    raise ValueError(f"PackedTernaryEinsum: eqn {eqn!r} must have the form "
                     "'<lead><contracted>,<contracted><rest>-><lead><rest>'")
  return lead, contracted, rest, out


class PackedTernaryEinsum(nn.Module):
  """`einsum(eqn, Q_int8(x), W~)` from a packed ternary kernel (params `packed`, `scale`).

  Attributes:
    shape: the latent kernel's shape (contracted dims first).
    eqn: the projection's einsum (see `split_eqn`).
    dtype: compute / output dtype.
    impl: `pallas_kernels.ternary_matmul.ternary_matmul` impl; None = "auto" on GPU (the Pallas
      kernels), "reference" (unpack + exact int32 matmul in jnp) elsewhere.
  """
  shape: Sequence[int]
  eqn: str
  dtype: Any = jnp.float32
  impl: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    lead, contracted, rest, _ = split_eqn(self.eqn)
    nc = len(contracted)
    if len(self.shape) != nc + len(rest):
      raise ValueError(f"PackedTernaryEinsum: shape {tuple(self.shape)} does not match eqn "
                       f"{self.eqn!r}")
    k = math.prod(self.shape[:nc])
    n = math.prod(self.shape[nc:])
    kp, np_ = padded_dims(k, n)  # the 2-bit layout's default padding (export_ternary's)
    # uint8 [Kp/4, Np] by default; int32 words [Kp/4, Np/4] when the given params hold words
    given = self.get_variable("params", "packed") if self.has_variable("params", "packed") else None
    if given is not None and given.dtype == jnp.int32:
      packed = self.param("packed", nn.initializers.zeros_init(), (kp // 4, np_ // 4), jnp.int32)
    else:
      packed = self.param("packed", nn.initializers.zeros_init(), (kp // 4, np_), jnp.uint8)
    scale = self.param("scale", nn.initializers.ones_init(), (), jnp.float32)
    if tuple(x.shape[x.ndim - nc:]) != tuple(self.shape[:nc]):
      raise ValueError(f"PackedTernaryEinsum: x shape {tuple(x.shape)} does not end with the "
                       f"contracted dims {tuple(self.shape[:nc])}")
    impl = self.impl or ("auto" if jax.default_backend() == "gpu" else "reference")
    lead_shape = x.shape[:x.ndim - nc]
    x_MK = x.astype(self.dtype).reshape(-1, k)
    y_MN = ternary_linear(x_MK, PackedTernary(packed=packed, scale=scale, shape=(k, n)),
                          impl=impl)
    return y_MN.reshape(*lead_shape, *self.shape[nc:])


def _export_tree(tree, path, words):
  out = {}
  for name, sub in tree.items():
    here = path + (name,)
    if isinstance(sub, dict) and "kernel" in sub and name in PROJECTION_K_AXES:
      extra = sorted(set(sub) - {"kernel"})
      if extra:
        raise ValueError(f"export_packed_ternary: {'/'.join(here)} has {extra}; BitLinear "
                         "projections carry only a kernel")
      p = export_ternary(jnp.asarray(sub["kernel"]), k_axes=PROJECTION_K_AXES[name])
      out[name] = {"packed": words_2bit(p.packed) if words else p.packed, "scale": p.scale}
    elif isinstance(sub, dict):
      out[name] = _export_tree(sub, here, words)
    else:
      out[name] = sub
  return out


def export_packed_ternary(params, cfg, words: bool = False):
  """Packs every projection kernel of a `linear="bitlinear"` model; returns (params, cfg).

  Args:
    params: raw params (`{"params": {...}}` or the inner dict) of a trained bitlinear model.
    cfg: its `ModelConfig` (`linear="bitlinear"`).
    words: store each `packed` as int32 words [Kp/4, Np/4] (what the GPU kernels read, no
      per-call conversion) instead of uint8 [Kp/4, Np]; same bytes either way.

  Returns:
    `(packed_params, packed_cfg)`: the same tree with each `<proj>/kernel` replaced by
    `<proj>/{packed uint8, scale float32}` and `packed_cfg = cfg` with `linear="ternary_packed"`;
    `Transformer(packed_cfg).apply(packed_params, tokens)` runs from the packed weights. The tree is
    checked against the packed model's own `init` structure.

  Raises:
    ValueError: `cfg.linear != "bitlinear"` or the tree does not match the packed model.
  """
  if cfg.linear != "bitlinear":
    raise ValueError(f"export_packed_ternary: cfg.linear must be 'bitlinear', got {cfg.linear!r}")
  from effjax.models.transformer import Transformer  # the model imports this module's layer
  wrapped = "params" in params and isinstance(params["params"], dict)
  inner = params["params"] if wrapped else params
  packed = _export_tree(dict(inner), (), bool(words))
  new_cfg = dataclasses.replace(cfg, linear="ternary_packed")
  shapes = jax.eval_shape(Transformer(new_cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  shapes = nn.unbox(shapes)
  def spec(s):
    if words and jnp.dtype(s.dtype) == jnp.uint8:  # the packed leaves, as words
      return (s.shape[0], s.shape[1] // 4), jnp.dtype(jnp.int32)
    return tuple(s.shape), jnp.dtype(s.dtype)
  want = jax.tree_util.tree_map(spec, shapes)
  got = jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), packed)
  if want != got:
    raise ValueError("export_packed_ternary: packed tree does not match the packed model's "
                     f"params:\nwant {want}\ngot  {got}")
  return ({**params, "params": packed} if wrapped else packed), new_cfg
