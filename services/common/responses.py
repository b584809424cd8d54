"""The JSON response class every route uses: orjson, Decimal kept exact."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from services.common.codec import dumps


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
