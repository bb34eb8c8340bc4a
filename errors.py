"""Every error a user can cause, one hierarchy under :class:`TdrError`.

Each carries one sentence saying what is wrong and what to do, naming the library parameter (``patch``,
``store``, ``force``), never a command-line flag: the CLI prints the sentence (adding the option that
sets ``param`` where the error has one) and exits non-zero, a notebook sees the exception. Errors about a setting's value are also ``ValueError``s, so code that
catches ``ValueError`` keeps working.
"""


class TdrError(Exception):
    """An error the user can fix (wrong path, missing model, mismatched store). Message = one sentence.

    ``param`` names the parameter whose value is at fault, where one is (e.g. "patch", "out").
    """

    exit_code = 1

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(TdrError, ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


class SettingsError(ConfigError):
    """A setting outside its choices, or settings that do not go together (a usage error: exit code 2)."""

    exit_code = 2


class UnknownBackboneError(ConfigError):
    """A backbone name that is not in the registry."""


class DatasetError(TdrError):
    """A dataset folder does not match its expected layout or pairing rule."""


class ImageReadError(TdrError):
    """An image file is missing, unreadable or corrupt."""


class StoreError(TdrError):
    """A guidance store is unreachable, of another schema, or inconsistent with the request."""


class StoreNotFoundError(StoreError):
    """No tdr store exists at the location given (ingest a dataset to create one)."""


class FingerprintMismatch(StoreError):
    """Guidance would be written under settings that differ from the store's."""


class DataIntegrityError(StoreError):
    """A chunk a reader needs is missing from the store or fails its checksum.

    ``what`` is the short reason alone ("its data is missing from the store", …) for reports that list
    many images.
    """

    def __init__(self, message: str, what: str = "", *, param: str | None = None):
        super().__init__(message, param=param)
        self.what = what or message


class ModelNotFoundError(TdrError):
    """A model or checkpoint is not available locally."""


class CheckpointError(TdrError):
    """A checkpoint that cannot be read, or is not of the kind asked for."""


class SchemaError(CheckpointError):
    """A checkpoint or run of a schema this version cannot read."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint whose keys or shapes do not fit the backbone."""


class OutputPathError(TdrError):
    """A file or folder to write results into cannot be written."""


class MissingDependencyError(TdrError):
    """An optional package a feature needs is not installed."""
