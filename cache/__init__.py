"""The guidance cache: datasets in, (degraded, guidance, clean) triples out. Imported by both halves."""

from ..errors import (
    DataIntegrityError, DatasetError, FingerprintMismatch, ImageReadError, ModelNotFoundError, StoreError, StoreNotFoundError,
    TdrError,
)
from .fingerprint import describe_difference, fingerprint_id
from .store import GUIDANCE_SIZE, SCHEMA, GuidanceSet, Split, Store, create_store, open_store, pixel_sha256

__all__ = [
    "DataIntegrityError", "DatasetError", "FingerprintMismatch", "ImageReadError", "ModelNotFoundError", "StoreError",
    "StoreNotFoundError", "TdrError",
    "describe_difference", "fingerprint_id",
    "GUIDANCE_SIZE", "SCHEMA", "GuidanceSet", "Split", "Store", "create_store", "open_store", "pixel_sha256",
]
