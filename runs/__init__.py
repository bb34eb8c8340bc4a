"""What both trainers share: settings, checkpoints, process start-up.

``tdr.runs`` is imported by ``tdr.pipeline`` (mapper/cleaner training) and ``tdr.guided`` (restorer
training) and imports neither, nor diffusers, typer or rich:

- ``config``: frozen dataclasses from dicts/TOML (nested ones too, types checked, unknown keys an error),
  layered defaults < the saved run's config < a TOML file < explicit settings; the resume check;
- ``checkpoint``: atomic save, safe load, RNG state, schema versions with explicit migrations;
- ``launch``: torchrun's environment → process group, rank and device.
"""

from .checkpoint import Migrations, SchemaError, load, rng_state, save, set_rng_state
from .config import ConfigError, check_resume, from_dict, layered, load_toml, merge, section, to_dict
from .launch import Launch, launch

__all__ = ["ConfigError", "Launch", "Migrations", "SchemaError", "check_resume", "from_dict", "launch", "layered",
           "load", "load_toml", "merge", "rng_state", "save", "section", "set_rng_state", "to_dict"]
