"""priorvae.priors: the prior registry and the built-in priors (one file each).

Importing this package registers ``standard_normal``, ``mog``, ``vampprior``, ``flow``,
``exemplar``, ``resampled`` and ``diffusion``.
See :mod:`priorvae.registry` for how to add your own.
"""

from priorvae.registry import (
    ENTRY_POINT_GROUP,
    Prior,
    PriorContext,
    build_prior,
    get_prior_class,
    list_priors,
    prior_arguments,
    register_prior,
)

from . import (  # noqa: F401  (registers the built-ins)
    diffusion,
    exemplar,
    flow,
    mog,
    resampled,
    standard_normal,
    vampprior,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Prior",
    "PriorContext",
    "build_prior",
    "get_prior_class",
    "list_priors",
    "prior_arguments",
    "register_prior",
]
