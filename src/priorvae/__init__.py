"""priorvae: variational autoencoders with pluggable, registered priors."""

from .config import Config, load_config
from .errors import PriorVAEError
from .priors import Prior, PriorContext, build_prior, list_priors, register_prior
from .vae import VAE, build_vae

__version__ = "0.1.0"

__all__ = [
    "Config",
    "load_config",
    "PriorVAEError",
    "Prior",
    "PriorContext",
    "build_prior",
    "list_priors",
    "register_prior",
    "VAE",
    "build_vae",
    "load_run",
    "Run",
    "__version__",
]


def __getattr__(name):  # lazy: keeps `import priorvae` light
    if name in ("load_run", "Run"):
        from . import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'priorvae' has no attribute {name!r}")
