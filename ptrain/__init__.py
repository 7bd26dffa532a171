"""ptrain: distributed post-pretraining of CLIP4Clip / CLIP2Video-class video-text retrieval models.

Importing ``ptrain`` is cheap (no torch); ``ptrain.load`` imports the model library on first use.
"""

from ptrain.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name):  # lazy public API, keeps `ptrain --help` fast
    if name == "load":
        from ptrain.model.api import load

        return load
    raise AttributeError(f"module 'ptrain' has no attribute {name!r}")
