"""Imports every implementation module so that each registers its name.

Plugins are found by walking their packages, so a new backbone, adaptor, LLM provider, encoder or
dataset is one module plus one YAML, with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

PLUGIN_PACKAGES = ("kar.backbones", "kar.data", "kar.knowledge", "kar.nn")


def import_all() -> None:
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            importlib.import_module(module.name)


import_all()
