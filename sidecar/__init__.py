"""webhook-sidecar: a security sidecar in front of AI agent runtimes (docs/cli.md)."""

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]), so the installed metadata always agrees with it.
__version__ = "0.1.0"
