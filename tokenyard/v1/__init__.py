"""Generated gRPC/protobuf stubs for proto/tokenyard/v1 (regenerate: python proto/generate.py)."""
