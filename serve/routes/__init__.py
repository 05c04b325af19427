"""HTTP routes, one router per concern: the Open Inference Protocol (`v2`), the toolkit's own
`/predict` and `/evaluate` (`predict`), and operations (`ops`: page, health, metrics)."""

from . import ops, predict, v2

ROUTERS = (ops.router, v2.router, predict.router)

__all__ = ["ROUTERS"]
