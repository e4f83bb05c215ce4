"""A parameterised einsum: the one linear layer every projection in the model goes through.

`Einsum(shape, eqn, axes)` owns a `kernel` of `shape` and computes `einsum(eqn, x, kernel)`.
`axes` are the kernel's logical axis names (e.g. `("embed", "heads", "head_dim")`); they are
attached to the parameter at init (`flax.linen.with_logical_partitioning`) and mapped to mesh axes
by the rules in `effjax.sharding`. The init is a truncated normal with variance 1/fan_in, where
fan_in is the product of the kernel dims contracted with `x`.

`project(eqn, x, kernel, matvec_impl=...)` is the product itself: `jnp.einsum`, or, for few rows
(decoding) with `matvec_impl="pallas"`, the split-K Pallas GEMV of `pallas_kernels.gemv` on the
operands viewed as 2-D matrices (a free reshape: the contracted axes of `x` are its trailing axes
and the kernel's leading ("kn") or trailing ("nk") axes, in the same order).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.config import MATVEC_IMPLS
from pallas_kernels import gemv as gemv_lib


def contracted_kernel_axes(eqn: str) -> tuple[int, ...]:
  """Indices of the kernel axes that are summed against the input in `eqn` ("BTD,DNH->BTNH")."""
  lhs, out = eqn.replace(" ", "").split("->")
  x_spec, w_spec = lhs.split(",")
  return tuple(i for i, a in enumerate(w_spec) if a in x_spec and a not in out)


def matvec_layout(eqn: str) -> tuple[str, int] | None:
  """(`"kn"` or `"nk"`, number of contracted axes) when `einsum(eqn, x, w)` is `x2 @ w2` (or
  `x2 @ w2ᵀ`) after flattening x to [rows, contracted] and w to 2-D without moving data (the
  contracted axes trail in `x` and lead ("kn") or trail ("nk") in `w`, in the same order); None
  otherwise."""
  lhs, out = eqn.replace(" ", "").split("->")
  x_spec, w_spec = lhs.split(",")
  con = "".join(a for a in x_spec if a in w_spec and a not in out)
  rows = x_spec[:len(x_spec) - len(con)]
  if not con or x_spec != rows + con or any(a in w_spec for a in rows):
    return None
  if w_spec.startswith(con) and out == rows + w_spec[len(con):]:
    return "kn", len(con)
  if w_spec.endswith(con) and out == rows + w_spec[:len(w_spec) - len(con)]:
    return "nk", len(con)
  return None


HYBRID_MAX_WEIGHT_BYTES = 16 << 20  # "hybrid": Pallas GEMV only for weights up to this size


def project(eqn: str, x, kernel, *, matvec_impl: str = "xla", out_dtype=None):
  """`einsum(eqn, x, kernel)`, returning `out_dtype` (default x's; float32 accumulates in float32).

  `matvec_impl`:
    * "xla": `jnp.einsum` as written, whatever the number of rows. On a GPU XLA rewrites one-row
      products of small weights (< 10M elements) into multiply + reduce; for one-axis
      contractions it transposes the weight once outside the decode loop and the reduction
      streams at ~2.3 TB/s on an H200, but for the attention output projection ("BTNH,NHD->BTD",
      weight contracted over its two leading axes) it materialises a weight-sized product and
      reduces it in a second kernel: 16 us for a 2048x2048 bf16 matrix (results/decode_bench.md).
      Flattening the operands to one 2-D dot does not change this (measured);
    * "pallas": few-row products (at most `gemv.MAX_M` rows of `x`: decoding) whose equation is a
      plain matrix product (`matvec_layout`) and whose shapes tile with the default blocks run in
      `pallas_kernels.gemv.gemv` on the operands flattened to 2-D (free reshapes; interpret mode
      off-GPU); everything else as "xla". On an H200 this is slower inside a decode step than
      XLA, which merges q/k/v and gate/up into one GEMM each (results/decode_bench.md), so it is
      opt-in;
    * "hybrid": "pallas" for weights of at most `HYBRID_MAX_WEIGHT_BYTES` (q/k/v/o of a 1B model,
      where the H200 sweep measured the Pallas GEMV 2-2.5x faster than XLA's, results/gemv_bench.md)
      and "xla" for larger ones (gate/up, down, LM head: XLA streams those at ~60-100% of copy
      bandwidth and merges gate/up into one GEMM);
    * "auto": on a GPU, "pallas" only for the few-row products XLA handles worst: weights of at
      most `HYBRID_MAX_WEIGHT_BYTES` contracted over more than one axis (the attention output
      projection "BTNH,NHD->BTD"; see "xla" above: 7 us instead of 16 in an H200 decode step);
      "xla" for every other product and off-GPU.
  """
  if matvec_impl not in MATVEC_IMPLS:
    raise ValueError(f"matvec_impl: got {matvec_impl!r}, allowed: {list(MATVEC_IMPLS)}")
  want = jnp.dtype(out_dtype or x.dtype)
  spec = matvec_layout(eqn)
  small = kernel.size * jnp.dtype(kernel.dtype).itemsize <= HYBRID_MAX_WEIGHT_BYTES
  use_pallas = spec is not None and (
      matvec_impl == "pallas" or (matvec_impl == "hybrid" and small)
      or (matvec_impl == "auto" and small and spec[1] > 1 and jax.default_backend() == "gpu"))
  if use_pallas:
    layout, n_con = spec
    row_shape = x.shape[:x.ndim - n_con]
    m = math.prod(row_shape)
    k = math.prod(x.shape[x.ndim - n_con:])
    out_w = kernel.shape[n_con:] if layout == "kn" else kernel.shape[:kernel.ndim - n_con]
    n = math.prod(out_w)
    blocks = gemv_lib.default_blocks(m, k, n, layout)
    if 1 <= m <= gemv_lib.MAX_M and gemv_lib.supported(m, k, n, **blocks):
      w2 = kernel.reshape((k, n) if layout == "kn" else (n, k))
      y = gemv_lib.gemv(x.reshape(m, k), w2, w_layout=layout, out_dtype=want,
                        interpret=jax.default_backend() != "gpu", **blocks)
      return y.reshape(*row_shape, *out_w)
  if out_dtype is None:  # the plain path
    return jnp.einsum(eqn, x, kernel)
  return jnp.einsum(eqn, x, kernel, preferred_element_type=jnp.float32).astype(want)


class Einsum(nn.Module):
  """`einsum(eqn, x, kernel)` with a learned kernel of `shape` (and optional bias over `out` axes).

  Attributes:
    shape: kernel shape.
    eqn: einsum equation `"<x>,<kernel>-><out>"` with one-letter axes.
    axes: logical axis names of the kernel, one per dim.
    use_bias: add a bias whose shape is the kernel's non-contracted dims.
    dtype: compute dtype; param_dtype: storage dtype.
    matvec_impl: kernel for few-row products ("xla" or "pallas"; see `project`).
  """
  shape: Sequence[int]
  eqn: str
  axes: Sequence[str]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  matvec_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    if len(self.axes) != len(self.shape):
      raise ValueError(f"Einsum: axes {self.axes} must name every dim of shape {self.shape}")
    contracted = contracted_kernel_axes(self.eqn)
    fan_in = math.prod(self.shape[i] for i in contracted) or 1
    init = nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(fan_in))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(self.shape), self.param_dtype)
    y = project(self.eqn, x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                matvec_impl=self.matvec_impl)
    if self.use_bias:
      bias_dims = [i for i in range(len(self.shape)) if i not in contracted]
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), tuple(self.axes[i] for i in bias_dims)),
          tuple(self.shape[i] for i in bias_dims), self.param_dtype)
      out_spec = self.eqn.replace(" ", "").split("->")[1]
      w_spec = self.eqn.replace(" ", "").split("->")[0].split(",")[1]
      bias_spec = "".join(w_spec[i] for i in bias_dims)
      # broadcast explicitly (the tests run with jax_numpy_rank_promotion="raise")
      bias_full = jnp.asarray(bias, self.dtype).reshape(
          [y.shape[j] if a in bias_spec else 1 for j, a in enumerate(out_spec)])
      y = y + bias_full
    return y
