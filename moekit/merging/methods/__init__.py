"""Every merge method, registered on import. One module per family of methods."""

from moekit.merging.methods import basic  # noqa: F401
