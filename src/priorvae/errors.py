"""Exceptions that the command line prints as one clear line, without a traceback (with
``PRIORVAE_DEBUG=1`` in the environment: with it)."""

__all__ = ["DEBUG_ENV", "PriorVAEError", "ConfigError", "DataError", "PluginError", "PriorError",
           "TrainingError", "RunError", "RunBusyError", "UntrustedCodeError"]

DEBUG_ENV = "PRIORVAE_DEBUG"  # 1: the command line shows an error's traceback too


class PriorVAEError(Exception):
    """Base class of every error priorvae raises on purpose (bad input, missing files...)."""


class ConfigError(PriorVAEError, ValueError):
    """A configuration file or a ``--set`` override is invalid."""


class DataError(PriorVAEError):
    """A data set cannot be found, read or downloaded."""


class PluginError(PriorVAEError, ValueError):
    """A plug-in (prior, data set, likelihood, network) cannot be registered, found or built,
    or a run folder names code that the user did not choose."""


class PriorError(PluginError):
    """A prior cannot be registered or built (unknown name, bad arguments, wrong shapes)."""


class TrainingError(PriorVAEError):
    """Training had to stop (for instance a non-finite loss)."""


class RunError(PriorVAEError):
    """A run folder is missing, incomplete, or holds a different configuration."""


class RunBusyError(RunError):
    """Another process holds the run folder's lock (training, evaluating or fitting in it)."""


class UntrustedCodeError(RunError):
    """A run folder names code (a file or module) that the user did not choose."""
