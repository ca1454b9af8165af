"""`tokenyard plan show` end to end: a real `ControlPlane` round over the state store the
control server reads (both backends), the Admin GetPlan over real gRPC, the CLI's table,
JSON and YAML; no plan yet, a stand-by replica, and a damaged document each say so; a
`route_by: predicted` control plane shows its routing mode and the noise its solve used."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from cli.admin import plan_dict
from cli.admin_errors import EXIT_DENIED, EXIT_NOT_FOUND, EXIT_REFUSED
from router.controlplane import ControlPlane, PrintActuator, parse_config
from router.plan_record import PLAN_KEY, PLAN_TTL_S, plan_message
from router.workload_recorder import STORE_KEY_PREFIX
from scheduler.planner.histogram import LengthHistogram
from tests.test_admin_cli import Plane, cli
from tests.test_admin_cli import plane as plane  # noqa: F401  (the fixture: a control plane on each backend)

MODEL = "llama-3-8b"
NOW_S = 1_800_000_000.0
CONFIG = {
    "store": "file:///unused", "actuator": "print", "input_edges": [0, 1024, 1_000_000], "output_edges": [0, 1_000_000],
    "pools": [{"name": "a10g", "gpu": "A10G", "usd_per_hour": 1.01, "capacity_rps": [[2.0], [0.5]]},
              {"name": "h100", "gpu": "H100", "usd_per_hour": 6.0, "capacity_rps": [[20.0], [10.0]]}],
    "autoscaler": {"interval_s": 10.0, "window_s": 60.0, "dwell_s": 60.0, "idle_s": 120.0},
    "metrics": {"port": None},
}


async def _one_round(plane: Plane, *, leading: bool = True, **extra: Any) -> ControlPlane:
    hist = LengthHistogram((0, 1024, 1_000_000), (0, 1_000_000), 10.0, 60)
    for slot in range(int(NOW_S // 10) - 5, int(NOW_S // 10)):
        hist.counts[(slot, "default", 0, 0)] = 40  # over the 60 s window: 3.33 req/s of short prompts
        hist.counts[(slot, "default", 1, 0)] = 10  # and 0.83 req/s of long ones
    await plane.store.put_load(STORE_KEY_PREFIX + "r0", {"models": {MODEL: hist.as_dict()}}, ttl_s=600)
    control = ControlPlane(parse_config({**CONFIG, **extra}, "cp.yaml"), plane.store, PrintActuator({"a10g": 1, "h100": 0},
                                                                                      emit=lambda _: None),
                           clock=lambda: NOW_S, identity="cp-0", leading=lambda: leading)
    await control.tick()
    return control


async def test_plan_show_reads_the_leaders_latest_plan(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    code, _, err = await cli(capsys, "plan", "show", *flags)
    assert code == EXIT_NOT_FOUND and "no plan in the state store" in err
    await _one_round(plane, leading=False)  # a stand-by replica writes nothing
    assert (await cli(capsys, "plan", "show", *flags))[0] == EXIT_NOT_FOUND

    control = await _one_round(plane)
    assert control.plan is not None
    code, out, err = await cli(capsys, "plan", "show", "-o", "json", *flags)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["leader"] == "cp-0" and shown["updated"] == "2027-01-15T08:00:00Z"
    assert shown["solved"] == shown["updated"] and shown["solver"] == control.plan.solver
    assert (shown["route_by"], shown["rank_noise_sd"], shown["rank_tau"]) == ("cell", None, None)
    assert shown["usd_per_hour"] == pytest.approx(control.plan.usd_per_hour, abs=1e-3)
    pools = {p["name"]: p for p in shown["pools"]}
    assert set(pools) == {"a10g", "h100"} and pools["a10g"]["current"] == 1 and pools["h100"]["current"] == 0
    targets = {name: state.target for name, state in control.pools.items()}
    assert {name: p["target"] for name, p in pools.items()} == targets
    assert {name: p["planned"] for name, p in pools.items() if p["planned"]} == control.plan.instances()
    assert sum(p["target"] for p in pools.values()) > 0
    routes = shown["routes"]
    assert [(r["input"], r["rate_rps"]) for r in routes] == [("[0, 1024)", 3.3333), ("[1024, 1000000)", 0.8333)]
    assert all(sum(r["pools"].values()) == pytest.approx(1.0) for r in routes)
    # The same as YAML, and as a table a person reads.
    code, out, _ = await cli(capsys, "plan", "show", "-o", "yaml", *flags)
    assert code == 0 and yaml.safe_load(out) == shown
    code, out, _ = await cli(capsys, "plan", "show", *flags)
    assert code == 0 and out.startswith("plan by cp-0, solved 2027-01-15T08:00:00Z")
    assert "\nroute_by cell\n" in out
    assert "NAME  GPU" in out and "SLO_CLASS" in out and "[1024, 1000000)" in out
    # A viewer may read it; nobody without a token may.
    assert (await cli(capsys, "plan", "show", "--address", plane.address, "--token-file",
                      str(plane.viewer_file)))[0] == 0
    bad = plane.tmp / "bad.token"
    bad.write_text("not-a-known-token-0123456789\n")
    assert (await cli(capsys, "plan", "show", "--address", plane.address, "--token-file", str(bad)))[0] == EXIT_DENIED


@pytest.mark.parametrize(("extra", "tau"), [({"rank_tau": 0.45}, 0.45), ({"rank_noise_sd": 0.0}, None)])
async def test_plan_show_says_a_predicted_plan_and_its_noise(plane: Plane, capsys: pytest.CaptureFixture[str],
                                                             extra: dict[str, Any], tau: float | None) -> None:
    """The noise shown is the one the re-solve used: derived from rank_tau on the live
    grid, or the configured one (0: exact, shown as 0, not as unset)."""
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    control = await _one_round(plane, route_by="predicted", **extra)
    assert control.plan is not None and control.rank_noise_sd is not None
    if tau is None:
        assert control.rank_noise_sd == 0.0
    else:
        assert control.rank_noise_sd > 0
    code, out, err = await cli(capsys, "plan", "show", "-o", "json", *flags)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["route_by"] == "predicted" and shown["rank_tau"] == tau
    assert shown["rank_noise_sd"] == pytest.approx(control.rank_noise_sd, abs=1e-4)
    code, out, _ = await cli(capsys, "plan", "show", "-o", "yaml", *flags)
    assert code == 0 and yaml.safe_load(out) == shown
    code, out, _ = await cli(capsys, "plan", "show", *flags)
    noise = f"rank_noise_sd {shown['rank_noise_sd']:g}"
    assert code == 0 and f"\nroute_by predicted, {noise}" + (f" (from rank_tau {tau:g})" if tau else "") + "\n" in out


async def test_a_damaged_plan_is_refused_by_name(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    await plane.store.put_load(PLAN_KEY, {"format": "tokenyard-plan/9"}, PLAN_TTL_S)
    code, _, err = await cli(capsys, "plan", "show", *flags)
    assert code == EXIT_REFUSED and "'tokenyard-plan/9'" in err and "tokenyard-plan/1" in err
    await plane.store.put_load(PLAN_KEY, {"format": "tokenyard-plan/1", "pools": [{"name": "a"}]}, PLAN_TTL_S)
    code, _, err = await cli(capsys, "plan", "show", *flags)
    assert code == EXIT_REFUSED and "is damaged" in err


def test_a_plan_from_before_route_by_was_recorded_reads_as_unknown() -> None:
    doc = {"format": "tokenyard-plan/1", "leader": "cp-0", "updated_unix_ms": 1, "solved_unix_ms": 0,
           "usd_per_hour": 0.0, "solver": "", "solve_s": 0.0, "pools": [], "routes": []}
    shown = plan_dict(plan_message(doc))
    assert (shown["route_by"], shown["rank_noise_sd"], shown["rank_tau"]) == ("", None, None)
