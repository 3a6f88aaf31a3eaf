"""Every merge method, registered on import. One module per family of methods; every module of this package is
imported, so a new method is one new module (or one function in an existing one)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
