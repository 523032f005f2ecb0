"""The zoo's own errors: each says what went wrong and what to do instead."""
from __future__ import annotations


class ZooError(Exception):
    """Base class of every error the zoo raises on purpose."""


class UnknownModelError(ZooError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateModelError(ZooError, ValueError):
    pass


class InputSizeError(ZooError, ValueError):
    pass


class TaskMismatchError(ZooError, ValueError):
    pass


class DatasetNotFoundError(ZooError, FileNotFoundError):
    pass


class DataFormatError(ZooError, ValueError):
    pass


class WeightsError(ZooError, RuntimeError):
    pass


class ModelArgumentError(ZooError, ValueError):
    """create_model got arguments the model cannot be built with (class count, unknown kwargs, sizes)."""


class NonFiniteError(ZooError, FloatingPointError):
    """A NaN or inf where a number must be finite: a training loss, an evaluation input, output or loss."""


class UnsupportedError(ZooError, NotImplementedError):
    """A documented limit of a model in one configuration (the message says which setting lifts it)."""
