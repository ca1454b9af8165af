"""Built-in dispatch policies. Each module registers its parts on import."""

from scheduler.policies import (  # noqa: F401
    affinity,  # simulator core: session_affinity, prefix_affinity
    basic,
    length_bucket,  # planner routing table
    load,
    slo_headroom,  # router-core
    spread,  # simulator core: round_robin, random, power_of_two, least_kv
    virtual_usage,  # least_virtual_usage (the migration policy's load measure)
)
