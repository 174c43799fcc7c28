"""advlens: where, inside a network, adversarial examples part ways with clean inputs.

Implements Valentim, Antunes & Lourenço, "Exploring Layerwise Adversarial Robustness
Through the Lens of t-SNE" (GECCO '24 Companion, arXiv 2406.14073).
"""

__version__ = "0.1.0"

from advlens.errors import AdvlensError, ConfigError  # noqa: E402

__all__ = ["AdvlensError", "ConfigError", "__version__"]
