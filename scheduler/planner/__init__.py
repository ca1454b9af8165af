"""Pool sizing: which GPU types, how many instances, which requests go where (Mélange-style).

Pure decision code: the allocation integer program (`solver`), Mélange's input format and
formulation (`melange`), the routing table the dispatcher follows (`routing`), a day's
schedule (`schedule`), the live length histogram (`histogram`), the autoscaling control
loop (`autoscale`) and the actuator protocol that applies a plan (`actuator`). Capacity
tables come from the simulator (sim/capacity.py); this package never runs it.
"""
