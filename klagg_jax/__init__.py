"""klagg_jax: KL barriers with outlier-aware aggregation over positions, for JAX and optax."""

from klagg_jax._aggregate import aggregate as aggregate
from klagg_jax._aggregate import cvar as cvar
from klagg_jax._aggregate import max as max  # noqa: A004 -- ka.max, as SPEC.md names it
from klagg_jax._aggregate import maximum as maximum
from klagg_jax._aggregate import mean as mean
from klagg_jax._aggregate import power_mean as power_mean
from klagg_jax._aggregate import quantile as quantile
from klagg_jax._aggregate import rmse as rmse
from klagg_jax._aggregate import smooth_max as smooth_max
from klagg_jax._aggregate import soft_quantile as soft_quantile
from klagg_jax._barrier import hinge as hinge
from klagg_jax._barrier import kl_barrier as kl_barrier
from klagg_jax._divergence import kl_per_position as kl_per_position
from klagg_jax._fused import fused_linear_kl as fused_linear_kl

__version__ = "0.1.0"

__all__ = [
    "aggregate",
    "cvar",
    "fused_linear_kl",
    "hinge",
    "kl_barrier",
    "kl_per_position",
    "max",
    "maximum",
    "mean",
    "power_mean",
    "quantile",
    "rmse",
    "smooth_max",
    "soft_quantile",
]
