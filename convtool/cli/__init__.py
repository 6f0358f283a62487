"""The `convtool` command line.

Each subcommand lives in its own `*_cmd.py` module that registers itself on `app`; importing this
package imports them all.
"""

import importlib
import pkgutil

from convtool.cli.app import app, main

for _info in pkgutil.iter_modules(__path__):
    if _info.name.endswith("_cmd"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["app", "main"]
