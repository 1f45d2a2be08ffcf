"""Self-supervised methods, one file each, registered by the name a spec uses. Importing the
package imports every module in it, so a new method's file is all it takes."""

import importlib
import pkgutil

from workers.methods.base import METHODS, Batch, Method, MethodContext, build_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Batch", "Method", "MethodContext", "build_method"]
