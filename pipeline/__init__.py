"""advlens: where, inside a network, adversarial examples part ways with clean inputs.

Implements Valentim, Antunes & Lourenço, "Exploring Layerwise Adversarial Robustness
Through the Lens of t-SNE" (GECCO '24 Companion, arXiv 2406.14073).

The Python API (:mod:`advlens.api`): ``advlens.analyze(model, images, labels, ...)``,
``advlens.load_run(path)`` and their ``advlens.Result``, imported on first use.
"""

from advlens._version import __version__
from advlens.errors import AdvlensError, ConfigError

__all__ = ["AdvlensError", "ConfigError", "Result", "__version__", "analyze", "load_run"]
_API = ("Result", "analyze", "load_run")


def __getattr__(name: str):
    # The API pulls in numpy and, when called, torch: import it on first use only, so that
    # `import advlens` (and the CLI's start) stays cheap.
    if name in _API:
        from advlens import api

        return getattr(api, name)
    raise AttributeError(f"module 'advlens' has no attribute {name!r}")
