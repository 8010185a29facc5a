"""Every way an OpenAI API request can fail, in OpenAI's error shape:
``{"error": {"message", "type", "param", "code"}}``.

The routes raise ``APIError``; ``api_error`` turns any other exception into one: a request body that does not
validate (400, ``param`` = the field), a refusal of the validation layer or of the engine (``RequestError``
400, ``Overloaded`` 429, ``Draining`` 503: statuses.py), or a failure of the engine (500).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from epserve.actors.engine.sampling import RequestError

from .. import statuses


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers or {}

    @classmethod
    def of(cls, status: statuses.Status, message: str, param: str | None = None, **kw) -> APIError:
        return cls(message, param, status=status.http, code=status.code, type=status.type, **kw)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {**self.headers, **({"x-request-id": request_id} if request_id else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def api_error(e: BaseException, prompt_param: str = "prompt") -> APIError:
    """``e`` as an API error (the engine's field ``prompt`` is this endpoint's ``prompt_param``)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValidationError):
        return _invalid_body(e)
    if isinstance(e, RequestError):
        param = prompt_param if e.field == "prompt" else e.field
        message = str(e)
        if param != e.field and message.startswith("prompt:"):
            message = f"{param} (prompt):" + message[len("prompt:"):]
        return APIError(message, param)
    status = statuses.of(e)
    if status is not None:
        return APIError.of(status, str(e))
    return APIError(f"the engine failed: {type(e).__name__}: {e}", status=500, type="server_error")


def _invalid_body(e: ValidationError) -> APIError:
    """The first field that did not validate, with the message its check wrote (requests.py)."""
    error = e.errors(include_url=False)[0]
    param = ".".join(map(str, error["loc"])) or None
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):
        return APIError(str(cause), cause.field)
    if isinstance(cause, ValueError):
        return APIError(str(cause), param)
    if error["type"] == "missing":
        return APIError(f"{param} is required", param)
    return APIError(f"{param}: {error['msg']}", param)
