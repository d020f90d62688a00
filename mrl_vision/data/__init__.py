"""Data modules: the built-in quickstart digits, users' image folders (torchvision), and FFCV files,
all ``MatryoshkaDataModule``s (``base.py``: the interface they share).

``FFCVDataModule`` needs the optional ffcv package; importing it without ffcv fails with one line
saying how to install it.
"""

from .base import MatryoshkaDataModule
from .imagefolder import ImageFolderDataModule
from .quickstart import QuickstartDataModule

__all__ = ["FFCVDataModule", "ImageFolderDataModule", "MatryoshkaDataModule", "QuickstartDataModule"]


def __getattr__(name: str):
    if name == "FFCVDataModule":  # imported lazily: ffcv is an optional extra
        from .ffcv_loader import FFCVDataModule

        return FFCVDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
