"""Built-in dispatch policies. Each module registers its parts on import."""

from scheduler.policies import basic, load  # noqa: F401
from scheduler.policies import slo_headroom  # noqa: F401  (router-core)
