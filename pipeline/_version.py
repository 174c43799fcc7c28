"""advlens' version, in a module of its own so that any module can read it without importing
the package's API facade (docs/design.md, "Module map")."""

__version__ = "0.1.0"
