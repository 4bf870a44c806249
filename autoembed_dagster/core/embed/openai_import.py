"""The `openai` package, imported without its optional aiohttp transport.

`import openai` also imports aiohttp when it is installed (openai's vendored httpx_aiohttp, for
`openai.DefaultAioHttpClient`), a quarter to a third of openai's import time. This project only
uses the synchronous client, and a drain's run worker pays every import at its start (the cold
start of a first write). Importing openai while `aiohttp` is marked unavailable makes openai take
its own fallback (the class then says to install the aiohttp extra); aiohttp itself stays
importable afterwards for anything else in the process. When openai or aiohttp was imported
before, nothing changes.
"""

from __future__ import annotations

import sys


def _import_openai():
    if "openai" in sys.modules:
        return sys.modules["openai"]
    block = "aiohttp" not in sys.modules
    if block:
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # `import aiohttp` raises ImportError
    try:
        import openai
    finally:
        if block and "aiohttp" in sys.modules and sys.modules["aiohttp"] is None:
            del sys.modules["aiohttp"]
    return openai


openai = _import_openai()
