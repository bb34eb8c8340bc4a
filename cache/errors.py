"""User-facing errors: each carries one clear sentence; the CLI prints it and exits non-zero."""


class TdrError(Exception):
    """An error the user can fix (wrong path, missing model, mismatched store). Message = one sentence."""

    exit_code = 1


class DatasetError(TdrError):
    """A dataset folder does not match its expected layout or pairing rule."""


class ImageReadError(TdrError):
    """An image file is missing, unreadable or corrupt."""


class StoreError(TdrError):
    """A guidance store is unreachable, of another schema, or inconsistent with the request."""


class FingerprintMismatch(StoreError):
    """Guidance would be written under settings that differ from the store's."""


class ModelNotFoundError(TdrError):
    """A model or checkpoint is not available locally."""


class DataIntegrityError(StoreError):
    """A chunk a reader needs is missing from the store or fails its checksum.

    ``what`` is the short reason alone ("its data is missing from the store", …) for reports that list
    many images.
    """

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message
