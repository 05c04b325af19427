"""HTTP routes, one router per concern: the Open Inference Protocol (`v2`), the toolkit's own
`/predict` and `/evaluate` (`predict`), and operations (`ops`: page, health, metrics)."""

from . import ops, predict, v2

# The busiest routes first: routing tries each route in turn (no route matches another's paths).
ROUTERS = (predict.router, v2.router, ops.router)

__all__ = ["ROUTERS"]
