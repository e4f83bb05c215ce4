"""Picks the linear layer class of every hidden projection from `ModelConfig.linear`.

  * "dense": `effjax.layers.linear.Einsum` (full precision);
  * "bitlinear": `effjax.layers.bitlinear.BitEinsum` (BitNet b1.58, "The Era of 1-bit LLMs",
    Ma et al., arXiv 2402.17764: ternary absmean weights and 8-bit per-token activations with a
    straight-through estimator; latent weights stay in `param_dtype`);
  * "ternary_packed": `effjax.layers.packed_ternary.PackedTernaryEinsum` (inference from the
    packed 2-bit export of a "bitlinear" model).

All three take the same `(shape, eqn, axes)` description and own a parameter tree under the same
module name, so the model code is the same for each. The embedding and the LM head are not
projections in this sense and stay in full precision (as in BitNet b1.58).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from effjax.layers.bitlinear import BitEinsum
from effjax.layers.linear import Einsum
from effjax.layers.packed_ternary import PackedTernaryEinsum

LINEARS = ("dense", "bitlinear", "ternary_packed")


def make_projection(linear: str, shape: Sequence[int], eqn: str, axes: Sequence[str], *,
                    name: str, dtype, param_dtype, use_bias: bool = False,
                    matvec_impl: str = "xla") -> nn.Module:
  """The projection module for `linear` (one of LINEARS); see the module docstring.

  `matvec_impl` picks the few-row (decode) product kernel of the dense layer
  (`effjax.layers.linear.project`); the ternary layers have their own kernels and ignore it.

  Raises:
    ValueError: unknown `linear`, or `use_bias` with a ternary layer (BitLinear has no bias).
  """
  if linear == "dense":
    return Einsum(shape, eqn, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  matvec_impl=matvec_impl, name=name)
  if use_bias:
    raise ValueError(f"model.linear={linear!r} has no bias; set model.attention_bias=False")
  if linear == "bitlinear":
    return BitEinsum(tuple(shape), eqn, dtype=dtype, param_dtype=param_dtype, axes=tuple(axes),
                     name=name)
  if linear == "ternary_packed":
    return PackedTernaryEinsum(tuple(shape), eqn, dtype=dtype, name=name)
  raise ValueError(f"model.linear: got {linear!r}, allowed: {list(LINEARS)}")
