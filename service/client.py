"""The CLI's side of the HTTP API: a small JSON client that sends the bearer token.

Where to: ``SELFSUP_API_URL`` and ``SELFSUP_TOKEN``, else the embedded stack's address
(``stack.json``) and the token `selfsup up` made for the local user (``<state>/token``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from service.config import StackInfo, StatePaths

API_URL_ENV, TOKEN_ENV = "SELFSUP_API_URL", "SELFSUP_TOKEN"
TIMEOUT_S = 120.0


class ApiError(Exception):
    def __init__(self, status: int, detail: str, problems: list[dict[str, str]] | None = None):
        super().__init__(detail)
        self.status = status
        self.problems = problems or []


class ApiClient:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    @classmethod
    def discover(cls, paths: StatePaths) -> ApiClient:
        url = os.environ.get(API_URL_ENV)
        if not url:
            stack = StackInfo.load(paths.stack_file)
            if stack is None or not stack.api_url:
                raise ApiError(
                    0,
                    f"no selfsup controller known for {paths.root}: start the stack with "
                    f"`selfsup up`, or set {API_URL_ENV} (and {TOKEN_ENV})",
                )
            url = stack.api_url
        token = os.environ.get(TOKEN_ENV)
        if token is None and paths.api_token_file.is_file():
            token = paths.api_token_file.read_text().strip()
        return cls(url, token)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, Any] | None = None,
    ) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)  # a list: the key repeated
        sent = {"Accept": "application/json", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise _api_error(error) from None
        except OSError as error:
            raise ApiError(
                0, f"cannot reach the selfsup controller at {self.url}: {error}"
            ) from None


def _api_error(error: urllib.error.HTTPError) -> ApiError:
    try:
        document = json.loads(error.read() or b"{}")
    except ValueError:
        document = {}
    detail = document.get("detail", error.reason)
    if isinstance(detail, list):  # FastAPI's own validation errors
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    return ApiError(error.code, str(detail), document.get("problems"))
