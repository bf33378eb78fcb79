"""Algorithm plug-ins: the registry ``ALGORITHMS`` (name -> class) and :func:`get_algorithm`.

Built-in algorithms are listed in ``_BUILTINS``; a plug-in defined elsewhere
joins with the :func:`register` decorator. Names are case-insensitive, and
``_`` and ``-`` are interchangeable (``dr_grpo`` = ``dr-grpo``).
"""
from __future__ import annotations

from .base import Algorithm, RolloutBatch
from .entropy_minimization import EMFT, EMRL
from .grpo import GRPO, RLOO, DrGRPO
from .gtpo import GRPOS, GTPO
from .seed_grpo import SeedGRPO

# The algorithms shipped with entropy-ops. New built-in modules (gtpo, grpo-s,
# seed-grpo, em-ft, em-rl) add their classes here.
_BUILTINS: tuple[type[Algorithm], ...] = (GRPO, DrGRPO, RLOO, GTPO, GRPOS, SeedGRPO, EMFT, EMRL)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


ALGORITHMS: dict[str, type[Algorithm]] = {_key(cls.name): cls for cls in _BUILTINS}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an :class:`Algorithm` subclass available by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not cls.name:
        raise TypeError(f"register expects an Algorithm subclass with a non-empty name, got {cls!r}")
    key = _key(cls.name)
    if key in ALGORITHMS and ALGORITHMS[key] is not cls:
        raise ValueError(f"an algorithm named {cls.name!r} is already registered ({ALGORITHMS[key].__name__})")
    ALGORITHMS[key] = cls
    return cls


def algorithm_class(name: str) -> type[Algorithm]:
    """The registered class for ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str) or _key(name) not in ALGORITHMS:
        raise ValueError(f"algo: unknown algorithm {name!r}; available: {sorted(ALGORITHMS)}")
    return ALGORITHMS[_key(name)]


def get_algorithm(name: str, **options) -> Algorithm:
    """An instance of the algorithm ``name`` with its ``options`` (``algo_options`` in the config)."""
    return algorithm_class(name)(**options)


__all__ = ["ALGORITHMS", "Algorithm", "RolloutBatch", "algorithm_class", "get_algorithm", "register"]
