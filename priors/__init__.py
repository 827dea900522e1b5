"""priorvae.priors: the Prior contract (:mod:`.base`), its registry and the built-in priors
(one file each).

Importing this package registers ``standard_normal``, ``mog``, ``vampprior``, ``flow``,
``exemplar``, ``resampled`` and ``diffusion``. See :mod:`priorvae.priors.base` for how to add
your own and :mod:`priorvae.registry` for the mechanism every plug-in kind shares.
"""

from . import (  # noqa: F401  (registers the built-ins)
    diffusion,
    exemplar,
    flow,
    mog,
    resampled,
    standard_normal,
    vampprior,
)
from .base import (
    CONTEXT_FIELDS,
    ENTRY_POINT_GROUP,
    PRIORS,
    Prior,
    PriorContext,
    build_prior,
    get_prior_class,
    list_priors,
    pin_prior_spec,
    prior_arguments,
    register_prior,
)

__all__ = [
    "CONTEXT_FIELDS",
    "ENTRY_POINT_GROUP",
    "PRIORS",
    "pin_prior_spec",
    "Prior",
    "PriorContext",
    "build_prior",
    "get_prior_class",
    "list_priors",
    "prior_arguments",
    "register_prior",
]
