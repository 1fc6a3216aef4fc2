"""The objectives `loss.name` chooses from: one module each, named as its loss, whose `SPEC` says which models
it fits, the `loss.*` keys it reads and how to build it. Adding an objective is adding its module here."""

import pkgutil


def objective_names() -> tuple[str, ...]:
    """The registered objectives, listed without importing them (loading a config imports no torch)."""
    return tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
