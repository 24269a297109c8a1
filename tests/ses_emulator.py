"""A local SES for tests and benchmarks: `moto_server` plus a recording proxy in front of it.

Both run as their own processes (so their timestamps do not wait for the test's event loop):

    emulator = await SesEmulator.start()
    settings = settings.model_copy(update={"EMAIL_TRANSPORT": "ses", **emulator.aws_settings()})
    await emulator.verify_sender("noreply@example.com")
    ...
    calls = await emulator.calls()            # every SendEmail the proxy saw, timestamped
    await emulator.throttle(5)                 # the next 5 SendEmail calls get throttled
    await emulator.inject(1, status=500, code="InternalFailure", delay=30)  # a hung SES
    messages = await emulator.sent_messages()  # what moto accepted (GET /moto-api/data.json)
    emulator.stop()

moto ignores configuration sets, tags and throttling, so the proxy records the request
parameters (ConfigurationSetName, EmailTags) and injects `TooManyRequestsException` itself.

Run the proxy alone with `python tests/ses_emulator.py --port P --upstream http://...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

SEND_PATH = "/v2/email/outbound-emails"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
}
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the proxy (runs in its own process) ------------------------------------------------------


@dataclass
class Fault:
    """What the next `count` SendEmail calls get instead of moto's answer."""

    count: int = 0
    status: int = 429
    code: str = "TooManyRequestsException"
    message: str = "Maximum sending rate exceeded."
    delay: float = 0.0  # seconds to hold the request first (a hung SES)


@dataclass
class ProxyState:
    upstream: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    fault: Fault = field(default_factory=Fault)
    session: aiohttp.ClientSession | None = None


def _summary(body: bytes) -> dict[str, Any]:
    try:
        params = json.loads(body)
    except ValueError:
        return {}
    return {
        "from": params.get("FromEmailAddress"),
        "to": params.get("Destination", {}).get("ToAddresses"),
        "config_set": params.get("ConfigurationSetName"),
        "tags": params.get("EmailTags"),
        "raw_bytes": len(params.get("Content", {}).get("Raw", {}).get("Data", "")),
    }


async def _forward(state: ProxyState, request: web.Request, body: bytes) -> web.Response:
    assert state.session is not None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    async with state.session.request(
        request.method, state.upstream + request.path_qs, headers=headers, data=body
    ) as upstream:
        payload = await upstream.read()
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        return web.Response(status=upstream.status, headers=out, body=payload)


async def _proxy(request: web.Request) -> web.StreamResponse:
    arrived = time.time()  # before the body: when the request reached "SES"
    state: ProxyState = request.app["state"]
    body = await request.read()
    if request.path != SEND_PATH or request.method != "POST":
        return await _forward(state, request, body)
    auth = request.headers.get("Authorization", "")
    akid = auth.partition("Credential=")[2].partition("/")[0]
    call = {"t": arrived, "access_key": akid, **_summary(body)}
    state.calls.append(call)
    fault = state.fault
    if fault.count > 0:
        fault.count -= 1
        call["injected"] = fault.code
        call["throttled"] = fault.status == 429
        if fault.delay:
            await asyncio.sleep(fault.delay)
        return web.json_response(
            {"message": fault.message},
            status=fault.status,
            headers={"x-amzn-ErrorType": fault.code},
        )
    response = await _forward(state, request, body)
    call["status"] = response.status
    return response


async def _calls(request: web.Request) -> web.Response:
    return web.json_response(request.app["state"].calls)


async def _inject(request: web.Request) -> web.Response:
    request.app["state"].fault = Fault(**await request.json())
    return web.json_response({"ok": True})


async def _reset(request: web.Request) -> web.Response:
    request.app["state"].calls.clear()
    return web.json_response({"ok": True})


def proxy_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    state = ProxyState(upstream=upstream.rstrip("/"))
    app["state"] = state

    async def session_ctx(app: web.Application) -> Any:
        state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), auto_decompress=False
        )
        yield
        await state.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/_proxy/calls", _calls)
    app.router.add_post("/_proxy/inject", _inject)
    app.router.add_post("/_proxy/reset", _reset)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


# --- the test side ------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


@dataclass
class SesEmulator:
    moto_url: str
    url: str  # the proxy: point AWS_ENDPOINT_URL here
    procs: list[subprocess.Popen[bytes]]

    @classmethod
    async def start(cls) -> SesEmulator:
        return await asyncio.to_thread(cls.start_sync)

    @classmethod
    def start_sync(cls) -> SesEmulator:
        bindir = os.path.dirname(sys.executable)
        moto_port, proxy_port = free_port(), free_port()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        moto = subprocess.Popen(
            [os.path.join(bindir, "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], **quiet
        )
        moto_url = f"http://127.0.0.1:{moto_port}"
        proxy = subprocess.Popen(
            [sys.executable, __file__, "--port", str(proxy_port), "--upstream", moto_url], **quiet
        )
        emulator = cls(moto_url, f"http://127.0.0.1:{proxy_port}", [moto, proxy])
        try:
            _wait_http(moto_url + "/moto-api/data.json", moto)
            _wait_http(emulator.url + "/_proxy/calls", proxy)
        except BaseException:
            emulator.stop()
            raise
        return emulator

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def aws_settings(self) -> dict[str, Any]:
        """Settings fields that point the SES transport at this emulator."""
        from pydantic import SecretStr

        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SecretStr("testing"),
        }

    def aws_env(self) -> dict[str, str]:
        """The same as environment variables (for a worker subprocess)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    async def verify_sender(self, address: str) -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "ses",
            region_name=REGION,
            endpoint_url=self.moto_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ) as ses:
            await ses.verify_email_identity(EmailAddress=address)

    async def _get(self, url: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            resp.raise_for_status()
            return json.loads(await resp.text())

    async def _post(self, url: str, body: dict[str, Any] | None = None) -> None:
        async with aiohttp.ClientSession() as http, http.post(url, json=body or {}) as resp:
            resp.raise_for_status()

    async def sent_messages(self) -> list[dict[str, Any]]:
        """Every message moto accepted: {id, source, destinations, raw_data}."""
        data = await self._get(self.moto_url + "/moto-api/data.json")
        messages: list[dict[str, Any]] = data.get("ses", {}).get("RawMessage", [])
        return messages

    async def calls(self) -> list[dict[str, Any]]:
        """Every SendEmail the proxy saw: {t (epoch s), from, to, config_set, tags, ...}."""
        calls: list[dict[str, Any]] = await self._get(self.url + "/_proxy/calls")
        return calls

    async def inject(self, count: int, **fault: Any) -> None:
        """The next `count` SendEmail calls fail: `status`, `code`, `message`, `delay` (s)."""
        await self._post(self.url + "/_proxy/inject", {"count": count, **fault})

    async def throttle(self, count: int) -> None:
        """The next `count` SendEmail calls get SES's "Maximum sending rate exceeded"."""
        await self.inject(count)

    async def reset_calls(self) -> None:
        await self._post(self.url + "/_proxy/reset")


@contextmanager
def running_emulator() -> Iterator[SesEmulator]:
    emulator = SesEmulator.start_sync()
    try:
        yield emulator
    finally:
        emulator.stop()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events inside any half-open window [t, t + window) (a sliding window)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="Recording SES proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(
        proxy_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=0.5,
    )


if __name__ == "__main__":
    main()
