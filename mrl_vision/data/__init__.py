"""Data modules: the built-in quickstart digits and users' image folders."""

from .imagefolder import ImageFolderDataModule
from .quickstart import QuickstartDataModule

__all__ = ["ImageFolderDataModule", "QuickstartDataModule"]
