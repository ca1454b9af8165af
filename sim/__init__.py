"""The simulated driver: event loop, engine model driver, trace replay, reports; and the
emulated engine that `tokenyard up` serves for real (same engine core, real clock)."""
