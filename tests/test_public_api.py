"""Every name rannc_py exports resolves, and the errors form one hierarchy."""

import pytest

import rannc_py


@pytest.mark.parametrize("name", rannc_py.__all__)
def test_exported_name_resolves(name: str) -> None:
    assert getattr(rannc_py, name) is not None


def test_errors_are_rannc_errors() -> None:
    for name in ("CommError", "ConfigError", "NoFeasiblePlanError", "PartitionError", "PlanError", "TraceError"):
        assert issubclass(getattr(rannc_py, name), rannc_py.RaNNCError)


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        rannc_py.nonexistent  # noqa: B018
