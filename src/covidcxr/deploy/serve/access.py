"""Who may use the service: loopback only by default; anywhere else only with a bearer token.

The token comes from a file (`--token-file`) or the COVIDCXR_TOKEN environment variable, never from the command line
(it would show in `ps` and shell history), and never appears in a log: uvicorn's access log has the request line
only, and the prediction log has no request headers.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from covidcxr.errors import InputError

TOKEN_ENV = "COVIDCXR_TOKEN"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name or address may be reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path | None) -> str | None:
    """The access token from `token_file`, else from $COVIDCXR_TOKEN, else None."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    path = Path(token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--token-file {path}: cannot read it ({type(exc).__name__}); "
                         "give a readable text file") from None
    if not token:
        raise InputError(f"--token-file {path}: the file is empty; put the access token in it")
    return token


def access_token(host: str, token_file: str | Path | None, no_auth: bool) -> str | None:
    """The token the service must demand, or None; refuses to serve beyond loopback without one unless `no_auth`."""
    token = read_token(token_file)
    if token is None and not no_auth and not is_loopback(host):
        raise InputError(f"--host {host} is reachable from other machines: give --token-file FILE or set {TOKEN_ENV} "
                         "(or --no-auth to serve without access control)")
    return token


def bearer_guard(token: str) -> Callable[..., None]:
    """A FastAPI dependency: 401 unless the request sends `Authorization: Bearer <token>`."""
    scheme = HTTPBearer(auto_error=False, description="the service's access token (--token-file or COVIDCXR_TOKEN)")
    expected = token.encode()

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        sent = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(sent, expected):  # constant time: the comparison leaks nothing
            raise HTTPException(401, "missing or wrong access token: send Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
