"""Storage options for remote stores (fsspec), from the command line and the environment.

``--storage-option KEY=VALUE`` (repeatable) and the environment variable ``TDR_STORAGE_OPTIONS`` (a JSON
object) become the ``storage_options`` fsspec passes to the filesystem (s3fs, gcsfs, HTTP); the command
line wins. A dotted key nests: ``client_kwargs.region_name=eu-west-1``. A value that parses as JSON
(``true``, ``3``, ``{"a": 1}``) is used as such, anything else as a string. Credentials belong in the
usual places (``AWS_*`` variables, ``~/.aws``, instance roles): tdr never writes storage options into a
store or prints them. fsspec's own variables (``FSSPEC_S3_ENDPOINT_URL=…``) work for every command too.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from ..errors import TdrError

ENV = "TDR_STORAGE_OPTIONS"


def parse_storage_options(pairs: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``["endpoint_url=http://…", "anon=true"]`` + ``$TDR_STORAGE_OPTIONS`` → a dict (None when empty)."""
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if environ.get(ENV):
        try:
            options = json.loads(environ[ENV])
        except json.JSONDecodeError:
            options = None
        if not isinstance(options, dict):
            raise TdrError(f"{ENV} must hold a JSON object, e.g. '{{\"endpoint_url\": \"http://…\"}}'.")
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise TdrError("A storage option needs KEY=VALUE (one was given without '=' or without a key).",
                           param="storage_option")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = options
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return options or None
