"""A check the MPI scripts share: every call of a list raises ConfigError naming what was wrong."""

from collections.abc import Callable, Iterable

from rannc_py.errors import ConfigError


def each_raises_config_error(cases: Iterable[tuple[Callable[[], object], str]]) -> None:
    """Call each ``bad`` of ``(bad, match)``; each must raise ConfigError whose message holds ``match``."""
    for bad, match in cases:
        try:
            bad()
        except ConfigError as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"expected ConfigError matching {match!r}")
