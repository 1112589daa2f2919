"""The one error raised when a bundled data set's package is not installed, and the import that raises it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDataError(ImportError):
    """A data set's source package is missing; the message says exactly what to install."""

    def __init__(self, dataset: str, install: str, detail: str = ""):
        self.dataset, self.install = dataset, install
        message = f"the {dataset} data set is not available: install it with `{install}`"
        super().__init__(f"{message} ({detail})" if detail else message)


def import_data_module(module: str, dataset: str, install: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingDataError` saying to run ``install``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDataError(dataset, install, str(error)) from error
