"""Tokenyard's command line, cross-cutting plumbing (logging), and the generated gRPC
stubs (`tokenyard.v1`, from proto/tokenyard/v1/*.proto)."""

__version__ = "0.1.0"
