"""Griffe extension for the API pages: show the values behind robustwrap's default sentinels.

robustwrap tells a default from the same value passed explicitly with `DefaultInt` /
`DefaultFloat` constants (`wrap(patch=DEFAULT_PATCH)` where `DEFAULT_PATCH = DefaultFloat(0.02)`),
so a signature read from the source would show `DEFAULT_PATCH`. This extension shows `0.02`.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Function

CONSTANT = re.compile(r"[A-Z][A-Z0-9_]*")
SENTINEL = re.compile(r"Default(?:Int|Float)\((?P<value>[^()]*)\)")


class SentinelDefaults(Extension):
    def on_function(self, *, func: Function, **kwargs: Any) -> None:
        for parameter in func.parameters:
            name = str(parameter.default) if parameter.default is not None else ""
            if not CONSTANT.fullmatch(name):
                continue
            try:
                value = str(func.module[name].value)
            except Exception:  # noqa: BLE001, S112 - not a constant griffe can resolve: leave the name
                continue
            match = SENTINEL.fullmatch(value)
            if match:
                parameter.default = match["value"]
