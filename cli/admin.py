"""`tokenyard policy|instances|keys|context|plan show`: the operator's CLI for the Admin service.

    tokenyard context set local --address 127.0.0.1:50051 --token-file .tokenyard/control-tokens.yaml
    tokenyard context use local
    tokenyard policy apply -f acme.yaml --reason "acme moves to interactive"   # diff, confirm, apply
    tokenyard policy diff -f acme.yaml            # exit 10 when the file differs from the stored one
    tokenyard policy history acme
    tokenyard policy rollback acme --to 3 --reason "v4 broke acme's TTFT" --yes
    tokenyard instances drain e0 ; tokenyard instances list -o json
    tokenyard instances cordon e0 --reason "INC-42: slow GPU" ; tokenyard instances uncordon e0 --reason ok
    tokenyard instances migrate --from e0 [--to e1] [--request REQ_ID]
    tokenyard plan show -o yaml
    tokenyard keys create acme ; tokenyard keys rotate 3f2a9c01b4de --yes ; tokenyard keys list
    tokenyard completion bash > /etc/bash_completion.d/tokenyard

Writes are compare-and-set: `apply`, `rollback` and `delete` read the current version,
show the diff, and send that version as `expected_version`, so an edit made by someone
else in between is a conflict (exit 4), never overwritten. Every call has a deadline
(`--timeout-s`). The exit codes (`EXIT_*`, docs/admin.md) say what went wrong, so scripts
can branch on them.

The context file (`$TOKENYARD_CONTEXTS`, else ~/.config/tokenyard/contexts.yaml, mode
0600) names control planes like a kubeconfig: address, token file, TLS CA and server
name. Tokens stay in their files; the context only points at them. A token file holds the
bare token or a control tokens YAML (`tokenyard up` writes one; its first token is used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cli.admin_errors import (
    EXIT_ABORTED,
    EXIT_DECLINED,
    EXIT_DIFFERS,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    rpc_exit_code,
)
from tokenyard import arg_types

MAX_FILE_BYTES = 1 << 20  # a policy file is a few hundred bytes; refuse anything absurd


# -- contexts -----------------------------------------------------------------------------
def contexts_path() -> Path:
    found = os.environ.get("TOKENYARD_CONTEXTS")
    return Path(found) if found else Path.home() / ".config" / "tokenyard" / "contexts.yaml"


def load_contexts(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"current": None, "contexts": {}}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(EXIT_INVALID, f"{path}: cannot read the context file: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("contexts", {}), dict):
        raise CliError(EXIT_INVALID, f"{path}: expected {{current: NAME, contexts: {{NAME: {{address, ...}}}}}}")
    doc.setdefault("contexts", {})
    return doc


def save_contexts(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(doc, out, sort_keys=False)
    os.replace(tmp, path)  # never a half-written context file


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    token: str
    ca_file: str | None = None
    server_name: str | None = None


def read_token(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(EXIT_INVALID, f"{path}: cannot read the token file: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("tokens"), list):  # a control tokens file
        for entry in doc["tokens"]:
            if isinstance(entry, dict) and isinstance(entry.get("token"), str):
                return str(entry["token"])
        raise CliError(EXIT_INVALID, f"{path}: a tokens file without a plain `token` entry")
    token = text.strip()
    if not token or "\n" in token:
        raise CliError(EXIT_INVALID, f"{path}: expected one token (or a control tokens YAML)")
    return token


def check_address(address: str, where: str) -> str:
    """HOST:PORT (or [IPv6]:PORT) with a port 1-65535, or a gRPC target with a scheme
    (`dns:///...`, `unix:...`) passed as it is. gRPC takes a port past 65535 modulo 65536
    (127.0.0.1:99999 dialled 34463), and a missing port means 443."""
    if ":" in address.split("/", 1)[0] and address.split(":", 1)[0] in ("dns", "unix", "unix-abstract", "ipv4",
                                                                          "ipv6", "vsock"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CliError(EXIT_USAGE, f"{where}: expected HOST:PORT with a port 1-65535 (e.g. 127.0.0.1:50051), "
                                   f"got {address!r}")
    return address


def resolve_target(args: argparse.Namespace) -> Target:
    doc = load_contexts(contexts_path())
    name = args.context or doc.get("current")
    ctx: dict[str, Any] = {}
    if name:
        if name not in doc["contexts"]:
            raise CliError(EXIT_NOT_FOUND, f"context {name!r} is not in {contexts_path()}; known: "
                                           f"{', '.join(sorted(doc['contexts'])) or 'none'}")
        ctx = dict(doc["contexts"][name] or {})
    address = args.address or ctx.get("address")
    token_file = args.token_file or ctx.get("token_file")
    if not address or not token_file:
        raise CliError(EXIT_USAGE, "no control plane: pass --address and --token-file, or `tokenyard context set` "
                                   "one and `tokenyard context use` it (`tokenyard up` prints the command)")
    check_address(str(address), "--address" if args.address else f"context {name}: address")
    return Target(str(address), read_token(str(token_file)), args.ca_file or ctx.get("ca_file"),
                  ctx.get("server_name"))


# -- talking to the control plane ---------------------------------------------------------


class Client:
    """The Admin stub with a deadline per call; gRPC errors become CliError."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        from router.auth import control_channel
        from tokenyard.v1 import admin_pb2_grpc

        self.channel = control_channel(target.address, target.token, ca_file=target.ca_file,
                                       server_name=target.server_name)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s
        self.address = target.address

    async def call(self, method: str, request: Any, *, missing_ok: bool = False) -> Any:
        import grpc

        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if missing_ok and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            detail = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                detail = f"control plane at {self.address} unavailable: {detail}"
            raise CliError(rpc_exit_code(exc.code()), detail) from None


def run_with_client(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    async def main() -> int:
        client = Client(resolve_target(args), args.timeout_s)
        try:
            return await body(client)
        finally:
            await client.channel.close()

    return asyncio.run(main())


def handle(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One line on stderr and a meaningful exit code for every failure."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CliError as exc:
            print(f"tokenyard {args.command}: {exc}", file=sys.stderr)
            return exc.code

    return wrapped


# -- output -------------------------------------------------------------------------------
def emit(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None) -> None:
    """`data` (a dict or a list of dicts) as a table, JSON or YAML."""
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=False))
    elif args.output == "yaml" or columns is None:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        rows = data if isinstance(data, list) else [data]
        print_table(rows, columns)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[c.upper() for c in columns]] + [["" if r.get(c) is None else str(r.get(c)) for c in columns]
                                              for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def version_dict(message: Any, *, with_diff: bool = False) -> dict[str, Any]:
    import datetime

    created = datetime.datetime.fromtimestamp(message.created_unix_ms / 1000, datetime.UTC)
    out = {"name": message.name, "version": message.version,
           "spec": json.loads(message.spec_json) if message.spec_json else None,
           "deleted": message.deleted, "author": message.author,
           "created": created.strftime("%Y-%m-%dT%H:%M:%SZ") if message.created_unix_ms else "",
           "reason": message.reason}
    if with_diff:
        out["diff"] = message.diff
    return out


# -- policy -------------------------------------------------------------------------------
def read_policy_file(path: str) -> tuple[str, dict[str, Any]]:
    """(name, spec) from a YAML file, or CliError(EXIT_INVALID) naming file and key path."""
    from router.policy_versions import PolicySpecError, parse_document, spec_dict

    source = Path(path)
    try:
        if path == "-":
            text = sys.stdin.read(MAX_FILE_BYTES + 1)
            size = len(text.encode("utf-8"))
        else:
            size = source.stat().st_size
            text = source.read_text(encoding="utf-8") if size <= MAX_FILE_BYTES else ""
        if size > MAX_FILE_BYTES:
            raise CliError(EXIT_INVALID, f"{path}: {size} bytes or more; a policy file is at most {MAX_FILE_BYTES}")
    except OSError as exc:
        raise CliError(EXIT_INVALID, f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(EXIT_INVALID, f"{path}: not UTF-8 text (expected a YAML policy file)") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(EXIT_INVALID, f"{where}: not valid YAML: {problem}") from None
    if len(docs) != 1:
        raise CliError(EXIT_INVALID, f"{path}: expected one policy document {{name, spec}}, found {len(docs)}")
    try:
        name, spec = parse_document(docs[0], path)
    except PolicySpecError as exc:
        message = str(exc)
        if message.startswith(f"{path}."):  # "acme.yaml.spec.ttft.ms: ..." -> "acme.yaml: spec.ttft.ms: ..."
            message = f"{path}: {message[len(path) + 1:]}"
        raise CliError(EXIT_INVALID, message) from None
    return name, spec_dict(spec)


def confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CliError(EXIT_DECLINED, f"{question} needs a confirmation, and stdin is not a terminal: pass --yes")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError(EXIT_DECLINED, "not confirmed; nothing changed")


async def current_version(client: Client, name: str) -> int:
    from tokenyard.v1 import admin_pb2

    found = await client.call("GetPolicyVersion", admin_pb2.GetPolicyVersionRequest(name=name), missing_ok=True)
    return int(found.version) if found is not None else 0


async def _write(args: argparse.Namespace, client: Client, method: str, build: Callable[..., Any],
                 name: str, question: str) -> int:
    """Dry run (server validation + diff), show it, confirm, then the compare-and-set write."""
    at = await current_version(client, name)
    preview = await client.call(method, build(expected_version=at, dry_run=True))
    if not preview.changed:
        print(f"policy {name} unchanged (version {at})")
        return EXIT_OK
    print(preview.policy.diff.rstrip() or f"(policy {name} deleted)")
    if args.dry_run != "none":
        if args.dry_run == "server":
            await print_simulation(args, client, name,
                                   json.loads(preview.policy.spec_json) if preview.policy.spec_json else None)
        print(f"dry run: policy {name} would become version {at + 1}; nothing stored")
        return EXIT_OK
    confirm(args, question)
    done = await client.call(method, build(expected_version=at, dry_run=False))
    print(f"policy {name}: version {done.policy.version} stored")
    return EXIT_OK


async def print_simulation(args: argparse.Namespace, client: Client, name: str, spec: dict[str, Any] | None) -> None:
    """`--dry-run=server` replay: of `--trace FILE`, else of the router's records of the last
    `--window` (the Admin RecentRecords call; an error when the router keeps none)."""
    from cli.policy_replay import fetch_recent_records, replay_policy_change, replay_records

    if args.trace:
        replay_policy_change(args.trace, name, spec, args.cluster, args.sim_requests or 2000)
        return
    window = args.window or "1h"
    window_s = parse_window(window)
    rows, truncated, source = await fetch_recent_records(client, window_s, args.sim_requests or 20000)
    replay_records(rows, f"the router's records of the last {window} ({source})", name, spec, args.cluster,
                   truncated=truncated)


def parse_window(text: str) -> float:
    """`1h`, `30m`, `90s` or plain seconds -> seconds (CliError naming --window otherwise)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    try:
        value = float(raw[:-1] if scale is not None else raw) * (scale or 1.0)
    except ValueError:
        value = -1.0
    if not 0 < value <= 7 * 86400:
        raise CliError(EXIT_USAGE, f"--window: expected a duration like 1h, 30m or 600s (at most 7d), got {text!r}")
    return value


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    reason = required_reason(args)
    name, spec = read_policy_file(args.file)

    def build(**kw: Any) -> Any:
        return admin_pb2.ApplyPolicyRequest(name=name, spec_json=json.dumps(spec), reason=reason, **kw)

    try:
        return run_with_client(args, lambda c: _write(args, c, "ApplyPolicy", build, name, f"apply policy {name}?"))
    except CliError as exc:
        # The server checks the spec against the router's policy document and answers with
        # the key path ("spec.slo_class: unknown SLO class ..."): say which file it is in.
        if exc.code == EXIT_INVALID and str(exc).startswith(("spec.", "name")):
            raise CliError(EXIT_INVALID, f"{args.file}: {exc}") from None
        raise


def required_reason(args: argparse.Namespace) -> str:
    check_dry_run_flags(args)
    reason = (args.reason or "").strip()
    if not reason and args.dry_run == "none":
        raise CliError(EXIT_USAGE, "--reason is required: say why the policy changes (it is kept in the history)")
    return reason or "dry run"


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    name, spec = read_policy_file(args.file)

    async def body(client: Client) -> int:
        at = await current_version(client, name)
        preview = await client.call("ApplyPolicy", admin_pb2.ApplyPolicyRequest(
            name=name, spec_json=json.dumps(spec), reason="diff", expected_version=at, dry_run=True))
        if not preview.changed:
            return EXIT_OK
        print(preview.policy.diff.rstrip())
        return EXIT_DIFFERS

    return run_with_client(args, body)


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    reason = required_reason(args)

    def build(**kw: Any) -> Any:
        return admin_pb2.RollbackPolicyRequest(name=args.name, to_version=args.to, reason=reason, **kw)

    return run_with_client(args, lambda c: _write(args, c, "RollbackPolicy", build, args.name,
                                                  f"roll policy {args.name} back to version {args.to}?"))


def cmd_policy_delete(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    reason = required_reason(args)

    def build(**kw: Any) -> Any:
        return admin_pb2.RemovePolicyRequest(name=args.name, reason=reason, **kw)

    return run_with_client(args, lambda c: _write(args, c, "RemovePolicy", build, args.name,
                                                  f"delete policy {args.name}?"))


def cmd_policy_get(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        found = await client.call("GetPolicyVersion", admin_pb2.GetPolicyVersionRequest(
            name=args.name, version=args.version or 0))
        data = version_dict(found)
        if args.output == "table":
            spec = data["spec"] or {}
            data = {**data, "slo_class": spec.get("slo_class", ""), "profile": spec.get("profile", "")}
            emit(args, data, ("name", "version", "slo_class", "profile", "author", "created", "reason"))
        else:  # the document form applies back as it is
            emit(args, {"kind": "SloPolicy", "name": data["name"], "spec": data["spec"],
                        "metadata": {k: data[k] for k in ("version", "author", "created", "reason")}})
        return EXIT_OK

    return run_with_client(args, body)


def cmd_policy_list(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        found = await client.call("ListCurrentPolicies", admin_pb2.ListCurrentPoliciesRequest())
        rows = []
        for message in found.policies:
            data = version_dict(message)
            spec = data["spec"] or {}
            rows.append({**data, "slo_class": spec.get("slo_class", "default"), "profile": spec.get("profile", "")})
        emit(args, rows, ("name", "version", "slo_class", "profile", "author", "created"))
        return EXIT_OK

    return run_with_client(args, body)


def cmd_policy_history(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        found = await client.call("PolicyHistory", admin_pb2.PolicyHistoryRequest(name=args.name, limit=args.limit))
        rows = [version_dict(v, with_diff=args.output != "table" or args.diffs) for v in found.versions]
        emit(args, rows, ("version", "created", "author", "deleted", "reason"))
        if args.output == "table" and args.diffs:
            for row in rows:
                print(f"\n# version {row['version']}\n{row['diff'].rstrip()}")
        return EXIT_OK

    return run_with_client(args, body)


# -- instances ----------------------------------------------------------------------------
def _utc(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else ""


def instance_dict(info: Any) -> dict[str, Any]:
    reg = info.registration
    kv = f"{100 * info.kv_blocks_used / info.kv_blocks_total:.0f}%" if info.kv_blocks_total else ""
    cordon = ({"by": info.cordon.by, "at": _utc(info.cordon.at_unix_ms), "reason": info.cordon.reason}
              if info.HasField("cordon") else None)
    return {"id": reg.instance_id, "pool": reg.pool, "model": reg.model, "gpu": reg.gpu, "source": info.source,
            "healthy": info.healthy, "draining": info.draining, "cordoned": cordon is not None, "cordon": cordon,
            "running": info.running, "waiting": info.waiting, "kv": kv, "inflight": info.router_inflight,
            "url": reg.url}


def cmd_instances_list(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        found = await client.call("ListInstances", admin_pb2.ListInstancesRequest(pool=args.pool or "",
                                                                                  model=args.model or ""))
        emit(args, [instance_dict(i) for i in found.instances],
             ("id", "pool", "model", "healthy", "draining", "cordoned", "running", "waiting", "kv", "inflight"))
        return EXIT_OK

    return run_with_client(args, body)


def cmd_instances_drain(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    draining = args.instances_command == "drain"

    async def body(client: Client) -> int:
        found = await client.call("DrainInstance", admin_pb2.DrainInstanceRequest(instance_id=args.id,
                                                                                  draining=draining))
        emit(args, instance_dict(found.instance), ("id", "pool", "healthy", "draining", "running", "inflight"))
        return EXIT_OK

    return run_with_client(args, body)


def cmd_instances_cordon(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    cordoned = args.instances_command == "cordon"
    reason = (args.reason or "").strip()
    if not reason:
        raise CliError(EXIT_USAGE, f"--reason is required: say why you {args.instances_command} {args.id} (it is "
                                   "kept with the cordon and logged)")

    async def body(client: Client) -> int:
        found = await client.call("CordonInstance", admin_pb2.CordonInstanceRequest(
            instance_id=args.id, cordoned=cordoned, reason=reason))
        data = instance_dict(found.instance)
        emit(args, {**data, "changed": found.changed, "by": (data["cordon"] or {}).get("by", ""),
                    "reason": (data["cordon"] or {}).get("reason", "")},
             ("id", "pool", "cordoned", "changed", "by", "reason", "running", "inflight"))
        return EXIT_OK

    return run_with_client(args, body)


def cmd_instances_migrate(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        done = await client.call("TriggerMigration", admin_pb2.TriggerMigrationRequest(
            source_instance_id=args.source, destination_instance_id=args.destination or "",
            request_id=args.request or "", reason=args.reason or ""))
        emit(args, {"migration_id": done.migration_id, "request_id": done.request_id,
                    "from": done.source_instance_id, "to": done.destination_instance_id, "committed": done.committed,
                    "state": done.state, "error": done.error, "error_message": done.error_message,
                    "blocks_copied": done.blocks_copied, "suspended_us": done.suspended_us,
                    "duration_ms": done.duration_ms},
             ("request_id", "from", "to", "state", "error", "blocks_copied", "suspended_us", "duration_ms"))
        # A move that started and aborted is an outcome, not a refusal: it says why, exit 9.
        return EXIT_OK if done.committed else EXIT_ABORTED

    return run_with_client(args, body)


# -- the control plane's plan -------------------------------------------------------------
def plan_dict(plan: Any) -> dict[str, Any]:
    return {"leader": plan.leader, "solved": _utc(plan.solved_unix_ms), "updated": _utc(plan.updated_unix_ms),
            "usd_per_hour": round(plan.usd_per_hour, 4), "solver": plan.solver, "solve_s": round(plan.solve_s, 4),
            "route_by": plan.route_by,
            "rank_noise_sd": round(plan.rank_noise_sd, 4) if plan.HasField("rank_noise_sd") else None,
            "rank_tau": plan.rank_tau if plan.HasField("rank_tau") else None,
            "pools": [{"name": p.name, "gpu": p.gpu, "tp": p.tensor_parallel, "current": p.replicas_current,
                       "target": p.replicas_target, "planned": p.planned_instances,
                       "usd_per_hour": round(p.usd_per_hour, 4), "load_instances": round(p.load_instances, 3),
                       "draining": p.draining} for p in plan.pools],
            "routes": [{"slo_class": r.slo_class, "input": f"[{r.input_lo}, {r.input_hi})",
                        "output": f"[{r.output_lo}, {r.output_hi})", "rate_rps": round(r.rate_rps, 4),
                        "pools": {k: round(v, 4) for k, v in sorted(r.pool_shares.items())}} for r in plan.routes]}


def _routing_line(data: dict[str, Any]) -> str:
    """`predicted, rank_noise_sd 0.81 (from rank_tau 0.45)`: how the plan routes, and on what noise."""
    line = data["route_by"] or "? (not recorded by this control plane)"
    if data["rank_noise_sd"] is not None:
        line += f", rank_noise_sd {data['rank_noise_sd']:g}"
    if data["rank_tau"] is not None:
        line += f" (from rank_tau {data['rank_tau']:g})" if data["rank_noise_sd"] is not None \
            else f", rank_tau {data['rank_tau']:g} (no keyed solve yet)"
    return line


def cmd_plan_show(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    async def body(client: Client) -> int:
        data = plan_dict(await client.call("GetPlan", admin_pb2.GetPlanRequest()))
        if args.output != "table":
            emit(args, data)
            return EXIT_OK
        print(f"plan by {data['leader'] or '?'}, solved {data['solved'] or 'never'}, updated {data['updated']}, "
              f"${data['usd_per_hour']}/h ({data['solver'] or 'no solve yet'})")
        print(f"route_by {_routing_line(data)}\n")
        print_table(data["pools"], ("name", "gpu", "tp", "current", "target", "planned", "usd_per_hour",
                                    "load_instances", "draining"))
        if data["routes"]:
            print()
            rows = [{**r, "pools": ", ".join(f"{k}={v:g}" for k, v in r["pools"].items())} for r in data["routes"]]
            print_table(rows, ("slo_class", "input", "output", "rate_rps", "pools"))
        return EXIT_OK

    return run_with_client(args, body)


def register_plan_show(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """`tokenyard plan show` beside `plan apply`: the `plan` command belongs to sim/plan_cli.py
    (the offline planner), which must not import the CLI, so its subcommand action is looked
    up here (argparse keeps it in `_subparsers`)."""
    plan = subparsers.choices.get("plan")
    if plan is None or plan._subparsers is None:
        return
    action = next(a for a in plan._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    p = action.add_parser("show", parents=[common], help="the control plane's current plan (pools, replicas now "
                                                         "and target, routing table, cost), from its state store")
    p.set_defaults(handler=handle(cmd_plan_show))


# -- API keys -----------------------------------------------------------------------------
def key_dict(info: Any) -> dict[str, Any]:
    import datetime

    def when(ms: int) -> str:
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else ""

    return {"key_id": info.key_id, "tenant": info.tenant, "created": when(info.created_unix_ms),
            "revoked": when(info.revoked_unix_ms)}


def cmd_keys(args: argparse.Namespace) -> int:
    from tokenyard.v1 import admin_pb2

    action = args.keys_command

    async def body(client: Client) -> int:
        if action == "list":
            found = await client.call("ListApiKeys", admin_pb2.ListApiKeysRequest(tenant=args.tenant or ""))
            emit(args, [key_dict(k) for k in found.keys], ("key_id", "tenant", "created", "revoked"))
            return EXIT_OK
        if action == "revoke":
            confirm(args, f"revoke API key {args.key_id}? requests with it will be refused")
            emit(args, key_dict(await client.call("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=args.key_id))),
                 ("key_id", "tenant", "revoked"))
            return EXIT_OK
        if action == "create":
            made = await client.call("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant=args.tenant))
        else:
            confirm(args, f"rotate API key {args.key_id}? the old key stops working now")
            made = await client.call("RotateApiKey", admin_pb2.RotateApiKeyRequest(key_id=args.key_id))
        emit(args, {**key_dict(made.key), "api_key": made.api_key}, ("key_id", "tenant", "api_key"))
        print("store the api_key now: it is not shown again (only its salted hash is kept)", file=sys.stderr)
        return EXIT_OK

    return run_with_client(args, body)


# -- context ------------------------------------------------------------------------------
def cmd_context(args: argparse.Namespace) -> int:
    path = contexts_path()
    doc = load_contexts(path)
    if args.context_command == "set":
        ctx = dict(doc["contexts"].get(args.name) or {})
        for key in ("address", "token_file", "ca_file", "server_name"):
            value = getattr(args, key)
            if value is not None:
                ctx[key] = str(Path(value).resolve()) if key in ("token_file", "ca_file") else value
        if not ctx.get("address") or not ctx.get("token_file"):
            raise CliError(EXIT_USAGE, f"context {args.name}: --address and --token-file are required")
        check_address(str(ctx["address"]), "--address")
        read_token(ctx["token_file"])  # a context that cannot authenticate is refused now
        doc["contexts"][args.name] = ctx
        doc["current"] = doc.get("current") or args.name
        save_contexts(path, doc)
        print(f"context {args.name} saved in {path}")
    elif args.context_command == "use":
        if args.name not in doc["contexts"]:
            raise CliError(EXIT_NOT_FOUND, f"context {args.name!r} is not in {path}; known: "
                                           f"{', '.join(sorted(doc['contexts'])) or 'none'}")
        doc["current"] = args.name
        save_contexts(path, doc)
        print(f"using context {args.name}")
    else:
        rows = [{"current": "*" if n == doc.get("current") else "", "name": n, **c}
                for n, c in sorted(doc["contexts"].items())]
        emit(args, rows, ("current", "name", "address", "token_file", "ca_file"))
    return EXIT_OK


# -- the argparse tree --------------------------------------------------------------------
SERVER_DRY_RUN_FLAGS = (("--trace", "trace"), ("--window", "window"), ("--cluster", "cluster"),
                        ("--sim-requests", "sim_requests"))


def check_dry_run_flags(args: argparse.Namespace) -> None:
    """The replay's flags mean something only with --dry-run=server: refuse them elsewhere
    (they were silently ignored, so a plain --dry-run "with --trace" replayed nothing), and
    check --window before the first call."""
    given = [flag for flag, dest in SERVER_DRY_RUN_FLAGS if getattr(args, dest, None) is not None]
    if given and args.dry_run != "server":
        raise CliError(EXIT_USAGE, f"{', '.join(given)}: only with --dry-run=server (the replay in the simulator)")
    if args.dry_run == "server" and args.window is not None:
        parse_window(args.window)


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--context", help="context of the context file to use (default: its current one)")
    parent.add_argument("--address", help="control plane host:port (overrides the context)")
    parent.add_argument("--token-file", help="file holding the bearer token (overrides the context)")
    parent.add_argument("--ca-file", help="CA certificate of a TLS control plane (overrides the context)")
    parent.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    parent.add_argument("--timeout-s", type=arg_types.seconds, default=10.0, help="deadline of each call (default: 10)")
    return parent


def _write_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="why (required; kept in the history)")
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--dry-run", nargs="?", const="client", default="none", choices=("none", "client", "server"),
                        help="validate on the server and show the diff, store nothing; =server also replays "
                             "the router's recent traffic (or --trace) in the simulator under the new policy")
    parser.add_argument("--trace", help="with --dry-run=server: a trace file to replay instead of the router's "
                                        "request records")
    parser.add_argument("--window", default=None,
                        help="with --dry-run=server: how much of the router's recent traffic to replay (default 1h)")
    parser.add_argument("--cluster", help="with --dry-run=server: a cluster YAML for the simulator (default: a "
                                          "small one)")
    parser.add_argument("--sim-requests", type=arg_types.at_least_one, default=None,
                        help="with --dry-run=server: at most this many requests (default: 2000 of --trace, the "
                             "newest 20000 records)")


def register(subparsers: Any) -> None:
    common = _common()
    policy = subparsers.add_parser("policy", help="tenant SLO policies: apply, get, list, diff, history, rollback")
    sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = sub.add_parser("apply", parents=[common], help="apply a policy file (diff, confirm, compare-and-set)")
    p.add_argument("-f", "--file", required=True, help="YAML {name, spec} ('-': stdin)")
    _write_flags(p)
    p.set_defaults(handler=handle(cmd_policy_apply))
    p = sub.add_parser("diff", parents=[common], help="diff a policy file against the stored one (exit 10: differs)")
    p.add_argument("-f", "--file", required=True)
    p.set_defaults(handler=handle(cmd_policy_diff))
    p = sub.add_parser("get", parents=[common], help="a tenant's policy (-o yaml: a file `apply` takes back)")
    p.add_argument("name")
    p.add_argument("--version", type=arg_types.at_least_one, help="an older version (default: the current one)")
    p.set_defaults(handler=handle(cmd_policy_get))
    p = sub.add_parser("list", parents=[common], help="every tenant's current policy")
    p.set_defaults(handler=handle(cmd_policy_list))
    p = sub.add_parser("history", parents=[common], help="who changed a policy, when, why and how")
    p.add_argument("name")
    p.add_argument("--limit", type=arg_types.at_least_one, default=20, help="the newest N versions (default 20)")
    p.add_argument("--diffs", action="store_true", help="print each version's diff under the table")
    p.set_defaults(handler=handle(cmd_policy_history))
    p = sub.add_parser("rollback", parents=[common], help="a new version equal to an old one")
    p.add_argument("name")
    p.add_argument("--to", type=arg_types.at_least_one, required=True, help="the version to restore")
    _write_flags(p)
    p.set_defaults(handler=handle(cmd_policy_rollback))
    p = sub.add_parser("delete", parents=[common], help="delete a tenant's policy (kept in the history)")
    p.add_argument("name")
    _write_flags(p)
    p.set_defaults(handler=handle(cmd_policy_delete))

    instances = subparsers.add_parser("instances", help="engine instances: list with live load, drain, cordon, migrate")
    sub = instances.add_subparsers(dest="instances_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", parents=[common], help="instances with their live load")
    p.add_argument("--pool")
    p.add_argument("--model")
    p.set_defaults(handler=handle(cmd_instances_list))
    for action, text in (("drain", "no new requests; running ones finish"), ("undrain", "back in service")):
        p = sub.add_parser(action, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(handler=handle(cmd_instances_drain))
    for action, text in (("cordon", "no new requests; running ones stay; nothing is moved away or scaled down"),
                         ("uncordon", "takes new requests again")):
        p = sub.add_parser(action, parents=[common], help=text)
        p.add_argument("id")
        p.add_argument("--reason", help="why (required; kept with the cordon and logged)")
        p.set_defaults(handler=handle(cmd_instances_cordon))
    p = sub.add_parser("migrate", parents=[common], help="move one running request off an instance now, and wait "
                                                         "for the outcome (exit 9: aborted)")
    p.add_argument("--from", dest="source", required=True, help="the instance to move a request off")
    p.add_argument("--to", dest="destination", help="the destination (default: the least loaded instance of the "
                                                    "model that takes new requests)")
    p.add_argument("--request", help="the request id (default: the one the migration policy picks)")
    p.add_argument("--reason", help="why (logged)")
    p.set_defaults(handler=handle(cmd_instances_migrate), timeout_s=60.0)
    register_plan_show(subparsers, common)

    keys = subparsers.add_parser("keys", help="tenants' API keys: create, rotate, revoke, list")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = sub.add_parser("create", parents=[common], help="a new key for a tenant (printed once)")
    p.add_argument("tenant")
    p.set_defaults(handler=handle(cmd_keys))
    for action, text in (("rotate", "a new key for the key's tenant; the old one is revoked"),
                         ("revoke", "the key stops working in every replica within a second")):
        p = sub.add_parser(action, parents=[common], help=text)
        p.add_argument("key_id")
        p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
        p.set_defaults(handler=handle(cmd_keys))
    p = sub.add_parser("list", parents=[common], help="the keys (never their secrets)")
    p.add_argument("--tenant")
    p.set_defaults(handler=handle(cmd_keys))

    context = subparsers.add_parser("context", help="control planes the CLI talks to (a kubeconfig-like file)")
    sub = context.add_subparsers(dest="context_command", metavar="ACTION", required=True)
    p = sub.add_parser("set", help="add or change a context")
    p.add_argument("name")
    p.add_argument("--address")
    p.add_argument("--token-file")
    p.add_argument("--ca-file")
    p.add_argument("--server-name", help="TLS server name when it differs from the address's host")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(handler=handle(cmd_context))
    p = sub.add_parser("use", help="make a context the current one")
    p.add_argument("name")
    p.set_defaults(handler=handle(cmd_context))
    p = sub.add_parser("list", help="the contexts (* marks the current one)")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(handler=handle(cmd_context))
