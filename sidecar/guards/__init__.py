"""One security control per module. :mod:`sidecar.app` puts them in order."""
