"""Built-in dispatch policies. Each module registers its parts on import."""

from scheduler.policies import basic, load  # noqa: F401
