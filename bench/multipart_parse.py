"""Benchmark: CPU to parse one `email/add` form (8 text fields, one 1 kB file) per parser.

Pure CPU in this process, no server: each arm turns the same bytes into the same fields and
file, one form at a time, and the script prints µs per form (best of --repeat rounds).

- `aiohttp`: aiohttp's MultipartReader as the gateway used it until issue 20 (part by part,
  headers through `BodyPartReader`, `read_chunk`).
- `gateway`: the gateway's `read_form` (`gateway/forms/`), on a stand-in request.
- `python-multipart`, `multipart`, `streaming-form-data`: the candidates, each with the least
  code that yields the same result (install them to compare: `pip install python-multipart
  streaming-form-data`; those missing are skipped). `multipart` and `python-multipart` both
  install a top-level `multipart` (python-multipart's a shim that hides the other): `multipart`
  is loaded by path here, and the `gateway` arm fails while python-multipart is installed.

    .venv/bin/python bench/multipart_parse.py
    .venv/bin/python bench/multipart_parse.py --size 102400 --number 500
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sysconfig
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, StreamReader, hdrs
from aiohttp.base_protocol import BaseProtocol
from email_common import FORM_FIELDS, form_bytes

FIELDS = {**FORM_FIELDS, "template": ""}

Result = tuple[dict[str, str], list[tuple[str, str, bytes]]]


def _stream(body: bytes) -> StreamReader:
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream


async def parse_aiohttp(body: bytes, ctype: str) -> Result:
    reader = MultipartReader({hdrs.CONTENT_TYPE: ctype}, _stream(body))
    fields: dict[str, str] = {}
    files: list[tuple[str, str, bytes]] = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "")
        part.headers.get(hdrs.CONTENT_ENCODING, "")
        data = bytearray()
        while chunk := await part.read_chunk(65536):
            data += chunk
        if part.filename is not None:
            ctype_ = part.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")
            files.append((part.filename, ctype_, bytes(data)))
        else:
            fields[part.name or ""] = data.decode()
    return fields, files


class _Request:
    """What `read_form` reads of a request (a mocked aiohttp request costs ~3 ms to make)."""

    def __init__(self, body: bytes, ctype: str) -> None:
        self.headers = {hdrs.CONTENT_TYPE: ctype}
        self.content_type = ctype.split(";", 1)[0]
        self.content_length = len(body)
        self.content = _stream(body)


async def parse_gateway(body: bytes, ctype: str) -> Result:
    from gateway.forms import read_form

    fields, parts = await read_form(
        _Request(body, ctype),  # type: ignore[arg-type]
        text_limits=dict.fromkeys(FIELDS, 1 << 20),
        file_fields={"files"},
        max_files=10,
        max_total=25 << 20,
    )
    return fields, [(p.filename, p.content_type, bytes(p.data)) for p in parts]


def _boundary(ctype: str) -> str:
    return ctype.split("boundary=", 1)[1].strip('"')


def _python_multipart() -> Callable[[bytes, str], Awaitable[Result]] | None:
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:
        return None

    async def parse(body: bytes, ctype: str) -> Result:
        fields: dict[str, str] = {}
        files: list[tuple[str, str, bytes]] = []
        headers: dict[bytes, bytes] = {}
        field: list[bytes] = []
        value: list[bytes] = []
        data: list[bytes] = []

        def on_header_field(b: bytes, start: int, end: int) -> None:
            field.append(b[start:end])

        def on_header_value(b: bytes, start: int, end: int) -> None:
            value.append(b[start:end])

        def on_header_end() -> None:
            headers[b"".join(field).lower()] = b"".join(value)
            field.clear()
            value.clear()

        def on_part_data(b: bytes, start: int, end: int) -> None:
            data.append(b[start:end])

        def on_part_end() -> None:
            _, options = parse_options_header(headers.get(b"content-disposition", b""))
            payload = b"".join(data)
            if b"filename" in options:
                ctype_ = headers.get(b"content-type", b"application/octet-stream").decode()
                files.append((options[b"filename"].decode(), ctype_, payload))
            else:
                fields[options[b"name"].decode()] = payload.decode()
            headers.clear()
            data.clear()

        parser = MultipartParser(
            _boundary(ctype),
            {  # type: ignore[arg-type]
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
        stream = _stream(body)
        while chunk := await stream.read(65536):
            parser.write(chunk)
        parser.finalize()
        return fields, files

    return parse


def _multipart() -> Callable[[bytes, str], Awaitable[Result]] | None:
    path = Path(sysconfig.get_paths()["purelib"]) / "multipart.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("defnull_multipart", path)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    async def parse(body: bytes, ctype: str) -> Result:
        fields: dict[str, str] = {}
        files: list[tuple[str, str, bytes]] = []
        stream = _stream(body)
        data = bytearray()
        segment = None
        with module.PushMultipartParser(_boundary(ctype)) as parser:
            while not parser.closed:
                for event in parser.parse(await stream.read(65536)):
                    if event is None:
                        if segment.filename is not None:
                            ctype_ = segment.header("Content-Type", "application/octet-stream")
                            files.append((segment.filename, ctype_, bytes(data)))
                        else:
                            fields[segment.name] = data.decode()
                        data.clear()
                    elif isinstance(event, bytes | bytearray):
                        data += event
                    else:
                        segment = event
        return fields, files

    return parse


def _streaming_form_data() -> Callable[[bytes, str], Awaitable[Result]] | None:
    try:
        from streaming_form_data import StreamingFormDataParser
        from streaming_form_data.targets import ValueTarget
    except ImportError:
        return None

    async def parse(body: bytes, ctype: str) -> Result:
        parser = StreamingFormDataParser({"Content-Type": ctype})
        targets = {name: ValueTarget() for name in FIELDS}
        for name, target in targets.items():
            parser.register(name, target)
        file = ValueTarget()
        parser.register("files", file)
        stream = _stream(body)
        while chunk := await stream.read(65536):
            parser.data_received(chunk)
        fields = {n: t.value.decode() for n, t in targets.items() if t._started}
        return fields, [(file.multipart_filename, file.multipart_content_type, file.value)]

    return parse


async def timed(
    parse: Callable[[bytes, str], Awaitable[Result]],
    body: bytes,
    ctype: str,
    number: int,
    repeat: int,
) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            await parse(body, ctype)
        best = min(best, (time.perf_counter() - started) / number)
    return best


async def run(args: argparse.Namespace) -> None:
    body, ctype = await form_bytes(args.size)
    arms: dict[str, Callable[[bytes, str], Awaitable[Result]] | None] = {
        "aiohttp": parse_aiohttp,
        "gateway": parse_gateway,
        "python-multipart": _python_multipart(),
        "multipart": _multipart(),
        "streaming-form-data": _streaming_form_data(),
    }
    expected = await parse_aiohttp(body, ctype)
    print(f"form: {len(body)} bytes, {len(expected[0])} text fields, one {args.size} byte file")
    for name, parse in arms.items():
        if parse is None:
            print(f"  {name:20} (not installed)")
            continue
        try:
            got = await parse(body, ctype)
        except ImportError as exc:
            print(f"  {name:20} (skipped: {exc})")
            continue
        # streaming-form-data gives no part's Content-Type to a ValueTarget: not compared.
        assert got[0] == expected[0] and [f[::2] for f in got[1]] == [f[::2] for f in expected[1]]
        seconds = await timed(parse, body, ctype, args.number, args.repeat)
        print(f"  {name:20} {seconds * 1e6:8.1f} µs per form")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="file bytes (1024)")
    parser.add_argument("--number", type=int, default=2000, help="forms per round (2000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best counts (5)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
