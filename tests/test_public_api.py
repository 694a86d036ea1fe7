"""The public surface is exactly what __all__ says, sorted, and typed."""

from __future__ import annotations

from importlib import resources
from types import ModuleType

import sse_handler


def test_all_is_sorted_and_complete() -> None:
    assert sse_handler.__all__ == sorted(sse_handler.__all__)
    # Submodules appear as attributes once imported; they are not the API.
    public = {
        name
        for name, value in vars(sse_handler).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public == set(sse_handler.__all__)
    for name in sse_handler.__all__:
        assert getattr(sse_handler, name) is not None


def test_py_typed_ships() -> None:
    assert resources.files("sse_handler").joinpath("py.typed").is_file()


def test_unknown_cid_error_is_a_key_error() -> None:
    assert issubclass(sse_handler.UnknownConnectionError, KeyError)
    assert issubclass(sse_handler.UnknownConnectionError, sse_handler.SSEHandlerError)
    assert issubclass(sse_handler.ConnectionClosedError, sse_handler.SSEHandlerError)
