"""Small shared utilities for the codegrid packages (atomic folders, model-folder I/O, and
`codegrid.precision` for fp32 on CPU).

`tokenizer` and `prior` both use this leaf package and never import each other.
"""

from codegrid.io import (
    atomic_directory,
    config_from_dict,
    load_model_folder,
    load_state_dict_strict,
    save_model_folder,
    sha256_of_file,
)

__all__ = [
    "atomic_directory",
    "config_from_dict",
    "load_model_folder",
    "load_state_dict_strict",
    "save_model_folder",
    "sha256_of_file",
]
