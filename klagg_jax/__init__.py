"""klagg_jax: KL barriers with outlier-aware aggregation over positions, for JAX and optax."""

from klagg_jax._aggregate import aggregate as aggregate
from klagg_jax._aggregate import cvar as cvar
from klagg_jax._aggregate import max as max  # noqa: A004 -- ka.max, the public alias of ka.maximum
from klagg_jax._aggregate import maximum as maximum
from klagg_jax._aggregate import mean as mean
from klagg_jax._aggregate import power_mean as power_mean
from klagg_jax._aggregate import quantile as quantile
from klagg_jax._aggregate import rmse as rmse
from klagg_jax._aggregate import smooth_max as smooth_max
from klagg_jax._aggregate import soft_quantile as soft_quantile
from klagg_jax._barrier import hinge as hinge
from klagg_jax._barrier import kl_barrier as kl_barrier
from klagg_jax._calibrate import calibrate_tau as calibrate_tau
from klagg_jax._calibrate import grad_pressure as grad_pressure
from klagg_jax._calibrate import separation as separation
from klagg_jax._ops.divergence.api import kl_per_position as kl_per_position
from klagg_jax._estimators import kl_estimate as kl_estimate
from klagg_jax._ops.fused.api import fused_linear_kl as fused_linear_kl
from klagg_jax._ops.topk.fused_logprobs import (
    fused_linear_topk_logprobs as fused_linear_topk_logprobs)
from klagg_jax._runtime_checks import check_logits as check_logits
from klagg_jax._runtime_checks import check_logprobs as check_logprobs
from klagg_jax._runtime_checks import check_topk as check_topk
from klagg_jax._sharding import Partition as Partition
from klagg_jax._ops.fused.api import fused_linear_kl_topk as fused_linear_kl_topk
from klagg_jax._ops.topk.api import kl_topk as kl_topk
from klagg_jax._ops.topk.api import topk_logprobs as topk_logprobs
from klagg_jax._version import __version__ as __version__

__all__ = [
    "Partition",
    "aggregate",
    "calibrate_tau",
    "check_logits",
    "check_logprobs",
    "check_topk",
    "cvar",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "fused_linear_topk_logprobs",
    "grad_pressure",
    "hinge",
    "kl_barrier",
    "kl_estimate",
    "kl_per_position",
    "kl_topk",
    "max",
    "maximum",
    "mean",
    "power_mean",
    "quantile",
    "rmse",
    "separation",
    "smooth_max",
    "soft_quantile",
    "topk_logprobs",
]
