"""The admin CLI's exit codes and its one error type, shared by `cli.admin` and the
commands it delegates to (`cli.policy_replay`), so neither imports the other for them."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1  # anything not listed below
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_INVALID = 3  # the file or the policy is invalid (the message names the key path)
EXIT_CONFLICT = 4  # the policy changed since it was read: re-read and apply again
EXIT_NOT_FOUND = 5  # no such policy, version, instance or context
EXIT_DENIED = 6  # unauthenticated or the token's role is not enough
EXIT_UNAVAILABLE = 7  # control plane or its store unreachable, or the deadline passed
EXIT_DECLINED = 8  # the confirmation was answered no (or cannot be asked: use --yes)
EXIT_ABORTED = 9  # `instances migrate`: the move started and was aborted (the output says why)
EXIT_DIFFERS = 10  # `policy diff`: the file differs from what is stored
EXIT_REFUSED = 11  # not in this state: migration off, no Worker address, an instance in a move already


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def rpc_exit_code(code: Any) -> int:
    import grpc

    return {grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID, grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
            grpc.StatusCode.ABORTED: EXIT_CONFLICT, grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED, grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
            grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE}.get(code, EXIT_ERROR)
