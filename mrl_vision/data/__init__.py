"""Data modules: the built-in quickstart digits, users' image folders (torchvision), FFCV files and
litdata streams, all ``MatryoshkaDataModule``s (``base.py``: the interface they share).

``FFCVDataModule`` needs the optional ffcv package and ``StreamingDataModule`` the optional litdata
package; importing either without it fails with one line saying how to install it.
"""

from .base import MatryoshkaDataModule
from .imagefolder import ImageFolderDataModule
from .quickstart import QuickstartDataModule

__all__ = ["FFCVDataModule", "ImageFolderDataModule", "MatryoshkaDataModule", "QuickstartDataModule", "StreamingDataModule"]


def __getattr__(name: str):
    if name == "FFCVDataModule":  # imported lazily: ffcv is an optional extra
        from .ffcv_loader import FFCVDataModule

        return FFCVDataModule
    if name == "StreamingDataModule":  # imported lazily: litdata is an optional extra
        from .streaming import StreamingDataModule

        return StreamingDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
