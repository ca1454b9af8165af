"""Tokenyard's brain: pure decision code shared by the live router and the simulator.

Nothing here opens a socket, reads a clock or touches a file (besides packaged data).
State goes in, a decision comes out.
"""
