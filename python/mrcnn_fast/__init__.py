"""mrcnn_fast: a fast Mask R-CNN with a torch-independent C++/CUDA core."""
from ._lib import get_num_threads, has_cuda, set_num_threads

__version__ = "0.1.0"
__all__ = ["Predictor", "has_cuda", "get_num_threads", "set_num_threads", "ops", "__version__"]


def __getattr__(name):
    # Submodules import torch-heavy code; load them on first use.
    import importlib

    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    if name in {"ops", "modeling", "data", "engine", "config", "predictor", "evaluation"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mrcnn_fast' has no attribute {name!r}")
