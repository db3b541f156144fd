"""A minimal HTTP/1.1 server that answers every request with the same SSE completion
stream: the other end for measuring the benchmark client itself. Raw asyncio, so the
server costs far less per request than any client under test.

    python tests/e2e/stub_sse_server.py PORT [TOKENS GAP_MS]

Without GAP_MS the whole stream goes out at once (2 tokens): the client's request rate.
With it, TOKENS chunks leave GAP_MS apart: the client's inter-token times minus GAP_MS
are its own overhead on ITL.
"""

from __future__ import annotations

import asyncio
import sys


def _event(i: int, last: bool) -> bytes:
    reason = '"length"' if last else "null"
    return b'data: {"choices":[{"index":0,"text":"t%d","finish_reason":%s}]}\n\n' % (
        i, reason.encode())


def _usage(n: int) -> bytes:
    return (b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d,'
            b'"total_tokens":%d}}\n\ndata: [DONE]\n\n' % (n, n + 1))


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int,
                 gap_s: float) -> None:
    events = [_event(i, i == tokens - 1) for i in range(tokens)] + [_usage(tokens)]
    whole = b"".join(events)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            if not gap_s:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(whole), whole))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for event in events:
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(gap_s)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int, tokens: int, gap_s: float) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, tokens, gap_s),
                                        "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    argv = sys.argv[1:]
    asyncio.run(main(int(argv[0]), int(argv[1]) if len(argv) > 1 else 2,
                     float(argv[2]) / 1000 if len(argv) > 2 else 0.0))
