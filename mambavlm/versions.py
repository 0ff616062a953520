"""The lowest versions of the libraries mambavlm was tested with, checked when the package is imported.

mambavlm uses transformers 5's configuration and cache APIs and PyTorch's SDPA with ``enable_gqa``;
older releases fail deep inside a run, so an import with one installed stops at once with a message
naming the library and both versions. ``pyproject.toml`` declares the same minimums
(``tests/test_versions.py`` keeps them equal). Tested: the whole suite with torch 2.11.0 +
transformers 5.17.0 and with torch 2.14.1 + transformers 5.24.0.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

__all__ = ["MINIMUM_VERSIONS", "check_installed_versions"]

MINIMUM_VERSIONS: dict[str, str] = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "timm": "1.0.29",
    "open_clip_torch": "3.3.0",
    "safetensors": "0.8.0",
    "pydantic": "2.14.4",
    "tokenizers": "0.23.2",
}
"""Distribution name -> the lowest version the test suite ran with."""


def check_installed_versions() -> None:
    """Raise ImportError naming every library of ``MINIMUM_VERSIONS`` installed older than its minimum
    (a missing one is left to its own import error)."""
    too_old = []
    for name, minimum in MINIMUM_VERSIONS.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if Version(installed).release < Version(minimum).release:
            too_old.append(f"{name} {installed} is installed; mambavlm needs {name}>={minimum}")
    if too_old:
        raise ImportError("; ".join(too_old) + " (pip install -U " + " ".join(
            s.split(" ", 1)[0] for s in too_old) + ")")
