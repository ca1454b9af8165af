"""The router config examples shipped in router/examples/ are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import load_router_config
from router.discovery import build_discovery

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "router" / "examples").glob("*.yaml"))


def test_examples_exist() -> None:
    assert EXAMPLES, "router/examples/ has no YAML files"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    config = load_router_config(path)
    assert config.source.endswith(path.name)
    assert config.tenants, "an example without tenants shows nothing of the tenant model"
    assert build_discovery(config.discovery, f"{path}: discovery")
