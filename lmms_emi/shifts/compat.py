"""``imagecorruptions`` 1.1.2 on current libraries: the one place its compatibility fixes live.

The package (Michaelis et al. 2019, the code of Hendrycks & Dietterich's ImageNet-C) was last released in
2020 and fails on today's NumPy / scikit-image / setuptools in three places. Each fix touches only the
package's own module namespace (never NumPy, scikit-image or setuptools), and only when it is needed:

* ``pkg_resources``: ``imagecorruptions.corruptions`` imports ``resource_filename`` from
  ``pkg_resources`` at import time (to find its frost photographs); setuptools 81 removed
  ``pkg_resources``. When it is missing, a module offering ``resource_filename`` (the file beside the named
  module, as pkg_resources resolves it) is placed in ``sys.modules`` for that one import and removed again
  afterwards, so nobody else sees it.
* ``np.float_``: ``fog`` (its ``plasma_fractal``) uses ``np.float_``, removed in NumPy 2. The package's
  module gets a view of NumPy that also answers ``float_`` (= ``float64``, what the alias meant); NumPy
  itself is not changed.
* ``multichannel=``: ``gaussian_blur`` and ``glass_blur`` call ``skimage.filters.gaussian(...,
  multichannel=True)``, removed in scikit-image 0.21 (now ``channel_axis=-1``). The package's module gets
  a ``gaussian`` that translates the argument.

Which fixes were applied is recorded (:func:`applied_fixes`) and lands in the family manifest.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any

__all__ = ["applied_fixes", "check_installed", "load_imagecorruptions"]

#: the packages of the ``shifts`` extra that the transforms import
REQUIRED = ("imagecorruptions", "nlpaug", "nltk")


def check_installed(what: str) -> None:
    """One line (UsageError) naming the missing packages of the shift transforms and the install that
    brings them, before ``what`` (a command) does any work."""
    import importlib.util

    from lmms_emi.errors import UsageError

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"{what} needs {', '.join(missing)} (the shift transforms): pip install 'lmms-emi[shifts]'"
        )


_LOCK = threading.Lock()
_FIXES: list[str] = []
_MODULE: Any = None


class _NumpyWithFloatAlias(types.ModuleType):
    """NumPy as seen by ``imagecorruptions.corruptions``: every attribute is NumPy's, plus ``float_``."""

    def __init__(self, numpy: Any) -> None:
        super().__init__("numpy")
        self._numpy = numpy

    def __getattr__(self, name: str) -> Any:
        if name == "float_":
            return self._numpy.float64
        return getattr(self._numpy, name)


def _resource_filename_module() -> types.ModuleType:
    module = types.ModuleType("pkg_resources")

    def resource_filename(module_name: str, resource: str) -> str:
        # pkg_resources resolves a resource beside the named module's file (a module or a package)
        folder = Path(importlib.import_module(module_name).__file__).parent
        return str(folder.joinpath(*Path(resource).parts))

    module.resource_filename = resource_filename  # type: ignore[attr-defined]
    return module


def _import_package() -> Any:
    # its `scipy.ndimage.interpolation` import still works (deprecated until SciPy 2): not a user's concern
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*scipy.ndimage")
        return importlib.import_module("imagecorruptions")


def _import_with_pkg_resources() -> Any:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules["pkg_resources"] = _resource_filename_module()
        _FIXES.append("pkg_resources: resource_filename resolved beside the module")
        try:
            return _import_package()
        finally:
            sys.modules.pop("pkg_resources", None)
    return _import_package()


def load_imagecorruptions() -> Any:
    """The ``imagecorruptions`` package, importable and working on current NumPy / scikit-image (once per
    process; thread-safe)."""
    global _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        import numpy as np

        package = _import_with_pkg_resources()
        corruptions = importlib.import_module("imagecorruptions.corruptions")
        if not hasattr(np, "float_"):
            corruptions.np = _NumpyWithFloatAlias(np)
            _FIXES.append("numpy: float_ = float64 inside imagecorruptions.corruptions")
        original = corruptions.gaussian
        if "multichannel" not in _parameters(original):

            def gaussian(image: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
                if multichannel:
                    kwargs.setdefault("channel_axis", -1)
                return original(image, *args, **kwargs)

            corruptions.gaussian = gaussian
            _FIXES.append("scikit-image: gaussian(multichannel=True) -> channel_axis=-1")
        _MODULE = package
        return package


def _parameters(fn: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def applied_fixes() -> list[str]:
    """The fixes :func:`load_imagecorruptions` applied in this process (for the manifest)."""
    load_imagecorruptions()
    return list(_FIXES)
