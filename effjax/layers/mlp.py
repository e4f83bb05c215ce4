"""Feed-forward blocks.

SwiGLU (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202, eq. FFN_SwiGLU):
`down(silu(gate(x)) * up(x))`, no biases.

Gated squared ReLU ("BitNet b1.58 2B4T Technical Report", Ma et al., arXiv 2504.12285, Sec. 2,
"Activation Function (FFN)"; squared ReLU from So et al., "Primer", arXiv 2109.08668):
`down(relu(gate(x))² * up(x))`, no biases. 2B4T also puts a sub-layer norm (SubLN) on the input of
the down projection: `down(norm(relu(gate(x))² * up(x)))` when `sub_norm` is given.

Both take the projection class from `linear` (`effjax.layers.projection`: "dense", "bitlinear",
"ternary_packed"); the default ("dense", no sub-norm) is the plain full-precision block.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax

from effjax.layers.norms import make_norm
from effjax.layers.projection import make_projection


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu2": lambda x: jax.numpy.square(jax.nn.relu(x)),
}


class GatedMLP(nn.Module):
  """`down(act(gate(x)) * up(x))` with hidden width `mlp_dim` (see module docstring).

  Attributes:
    activation: "silu" (SwiGLU) or "relu2" (gated squared ReLU).
    linear: projection class name for gate/up/down.
    sub_norm: optional factory `name -> norm module` for the SubLN before `down`.
    matvec_impl: few-row product kernel of dense projections (`effjax.layers.linear.project`).
  """
  d_model: int
  mlp_dim: int
  dtype: object
  param_dtype: object
  activation: str = "silu"
  linear: str = "dense"
  sub_norm: Optional[Callable[[str], nn.Module]] = None
  matvec_impl: str = "xla"

  @nn.compact
  def __call__(self, x_BTD):
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation: got {self.activation!r}, allowed: {sorted(_ACTIVATIONS)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, matvec_impl=self.matvec_impl)
    D, F = self.d_model, self.mlp_dim
    gate_BTF = make_projection(self.linear, (D, F), "BTD,DF->BTF", ("embed", "mlp"), name="gate",
                               **kw)(x_BTD)
    up_BTF = make_projection(self.linear, (D, F), "BTD,DF->BTF", ("embed", "mlp"), name="up",
                             **kw)(x_BTD)
    h_BTF = _ACTIVATIONS[self.activation](gate_BTF) * up_BTF
    if self.sub_norm is not None:
      h_BTF = self.sub_norm("mlp_sub_norm")(h_BTF)
    return make_projection(self.linear, (F, D), "BTF,FD->BTD", ("mlp", "embed"), name="down",
                           **kw)(h_BTF)


class SwiGLU(GatedMLP):
  """SwiGLU MLP with hidden width `mlp_dim`."""
  activation: str = "silu"


class ReLU2GLU(GatedMLP):
  """Gated squared-ReLU MLP (BitNet b1.58 2B4T) with hidden width `mlp_dim`."""
  activation: str = "relu2"


MLPS = {"swiglu": SwiGLU, "relu2": ReLU2GLU}


def make_mlp(cfg, name: str = "mlp") -> GatedMLP:
  """The MLP named by `cfg.mlp_type`, with `cfg.linear` projections and, if `cfg.sub_ln`, the
  2B4T sub-norm (of `cfg.norm_type`) before the down projection."""
  if cfg.mlp_type not in MLPS:
    raise ValueError(f"model.mlp_type: got {cfg.mlp_type!r}, allowed: {sorted(MLPS)}")
  sub_norm = None
  if cfg.sub_ln:
    sub_norm = lambda n: make_norm(cfg, n, axis_name="mlp")  # noqa: E731
  return MLPS[cfg.mlp_type](cfg.d_model, cfg.mlp_dim, cfg.compute_dtype, cfg.weight_dtype,
                            linear=cfg.linear, sub_norm=sub_norm, matvec_impl=cfg.matvec_impl,
                            name=name)
