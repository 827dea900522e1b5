"""priorvae.priors: the prior registry and the built-in priors (one file each).

Importing this package registers ``standard_normal``, ``mog``, ``vampprior`` and ``flow``.
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

from . import flow, mog, standard_normal, vampprior  # noqa: F401  (registers the built-ins)

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
