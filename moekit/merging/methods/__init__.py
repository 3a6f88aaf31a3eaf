"""Every merge method, registered on import. One module per family of methods."""

from moekit.merging.methods import basic, model_stock, ram, sce, selective, spherical, task_vectors  # noqa: F401
