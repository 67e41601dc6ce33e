"""Optional dependencies: import one where it is used, or fail with the ``pip install`` line that brings it.

restune's core needs torch, timm and a few small packages; the chart of ``restune demo`` and ``restune plot``
(matplotlib), the suite's ``digits`` task and the pretraining probe (scikit-learn) and ``restune bench``'s peers
(peft) are extras, so that ``pip install restune`` stays small. Importing them through :func:`require` turns a bare
``ModuleNotFoundError`` deep inside a run into a message that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "DISTRIBUTIONS"]

#: The pip name of each optional top-level module, where it differs from the module's name.
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``), or raise an ImportError naming restune's extra for it.

    Only the absence of the module itself (or of a package above it) is translated; any other import failure, such as
    a broken dependency of an installed package, is raised unchanged because installing the extra would not fix it.

    Args:
        module: Dotted module name to import.
        extra: The extra of restune that installs it (``plot``, ``suite``, ``peft``).
        purpose: What needs it, as the message's subject (e.g. ``"restune plot"``).

    Returns:
        The imported module.

    Raises:
        ImportError: ``"restune plot needs matplotlib: pip install 'restune[plot]'"`` when the module is missing.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        parts = module.split(".")
        if error.name not in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise
        top = parts[0]
        package = DISTRIBUTIONS.get(top, top)
        message = f"{purpose} needs {package}: pip install 'restune[{extra}]'"
        raise ImportError(message, name=module) from error
