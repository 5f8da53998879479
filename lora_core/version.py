"""The pack version, written into every file we save (keep in step with pyproject.toml)."""
__version__ = "0.1.0"
