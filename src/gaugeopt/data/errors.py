"""The one error raised when a bundled data set's package is not installed."""

from __future__ import annotations


class MissingDataError(ImportError):
    """A data set's source package is missing; the message says exactly what to install."""

    def __init__(self, dataset: str, install: str, detail: str = ""):
        self.dataset, self.install = dataset, install
        message = f"the {dataset} data set is not available: install it with `{install}`"
        super().__init__(f"{message} ({detail})" if detail else message)
