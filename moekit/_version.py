"""The version, in a module of its own: `moekit` itself may be shadowed by a `moekit` folder in the working
directory (a namespace package, which has no attributes), its submodules are not."""

__version__ = "0.1.0"
