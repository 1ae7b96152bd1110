"""Helpers of the family tests: read back what a family's extract function produced for each forward."""

from __future__ import annotations

import pytest

from moe_monitor.routing import Routing


@pytest.fixture
def record():
    """``record(layer) -> list``: every Routing the layer's extract returns from then on, appended to the list."""

    def attach(layer) -> list[Routing]:
        seen: list[Routing] = []
        extract = layer.extract

        def recording(module, args, output):
            routing = extract(module, args, output)
            seen.append(routing)
            return routing

        layer.extract = recording
        return seen

    return attach
