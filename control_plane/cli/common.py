"""What every command shares: its error type and the HTTP client of operator commands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import aiohttp


class CliError(Exception):
    """A command refused its arguments or failed; printed without a traceback.

    Exit codes: 2 for bad arguments or input, 1 for a refusal or failure elsewhere.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def read_file(path: Path, what: str) -> bytes:
    """A file an argument names; raises CliError naming the argument and the file."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror}") from None


def add_client_options(p: argparse.ArgumentParser) -> None:
    """--server and --token, defaulting to MODELFLEET_SERVER and MODELFLEET_TOKEN."""
    p.add_argument("--server", help="control plane URL (env MODELFLEET_SERVER)")
    p.add_argument("--token", help="API token (env MODELFLEET_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")


def client_settings(args: argparse.Namespace) -> tuple[str, str]:
    """The server URL and token; raises CliError when either is missing."""
    server = args.server or os.environ.get("MODELFLEET_SERVER")
    token = args.token or os.environ.get("MODELFLEET_TOKEN")
    if not server:
        raise CliError("no control plane: pass --server or set MODELFLEET_SERVER")
    if not token:
        raise CliError("no API token: pass --token or set MODELFLEET_TOKEN")
    return server.rstrip("/"), token


async def api_call(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    data: Any = None,
    content_type: str | None = None,
    ok: tuple[int, ...] = (200, 201),
) -> tuple[int, Any]:
    """Call the control plane; raises CliError with the server's message on a refusal."""
    server, token = client_settings(args)
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s,
            s.request(
                method, f"{server}/api/v1{path}", headers=headers, json=json_body, data=data
            ) as resp,
        ):
            text = await resp.text()
            body = json.loads(text) if text else None
            if resp.status not in ok:
                err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                field = f" (field: {err['field']})" if err.get("field") else ""
                raise CliError(f"HTTP {resp.status}: {err.get('message', text)}{field}", 1)
            return resp.status, body
    except aiohttp.ClientError as exc:
        raise CliError(f"cannot reach {server}: {exc}", 1) from None
    except ValueError:
        raise CliError(f"{server} answered with something that is not JSON", 1) from None


async def api_bytes(args: argparse.Namespace, path: str) -> bytes:
    """GET a binary answer; raises CliError as :func:`api_call`."""
    server, token = client_settings(args)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s,
            s.get(f"{server}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}) as resp,
        ):
            data = await resp.read()
            if resp.status != 200:
                try:
                    err = json.loads(data).get("error", {})
                except (ValueError, AttributeError):
                    err = {}
                message = err.get("message") or data[:300].decode(errors="replace")
                raise CliError(f"HTTP {resp.status}: {message}", 1)
            return data
    except aiohttp.ClientError as exc:
        raise CliError(f"cannot reach {server}: {exc}", 1) from None
