"""The error classes, under their former import path: they live in :mod:`tdr.errors`."""

from ..errors import (  # noqa: F401  (re-exported for code that imports them from here)
    DataIntegrityError, DatasetError, FingerprintMismatch, ImageReadError, ModelNotFoundError, StoreError,
    StoreNotFoundError, TdrError,
)
