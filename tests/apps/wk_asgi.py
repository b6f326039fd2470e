"""ASGI 3 test app for the asgi worker tests: one route per protocol edge.

Environment: WK_LIFESPAN=fail|raise|none (startup behaviour), WK_STARTUP_DELAY, WK_MARK_DIR (files written
on lifespan shutdown and on http.disconnect, so tests can see them from outside).
"""

import asyncio
import json
import os
import time
from urllib.parse import parse_qs

MARK_DIR = os.environ.get("WK_MARK_DIR", "")


def _mark(name: str, text: str = "") -> None:
    if MARK_DIR:
        with open(os.path.join(MARK_DIR, name), "a") as f:
            f.write(text + "\n")


async def _lifespan(scope, receive, send):
    mode = os.environ.get("WK_LIFESPAN", "")
    if mode == "none":
        raise RuntimeError("lifespan not supported here")
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if mode == "fail":
                await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
                return
            if mode == "raise":
                raise ValueError("startup exploded")
            await asyncio.sleep(float(os.environ.get("WK_STARTUP_DELAY", "0")))
            scope["state"]["greeting"] = "hello from lifespan"
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            _mark("shutdown", str(os.getpid()))
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send, status, body, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive):
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunks.append(message["body"])
        if not message.get("more_body"):
            return b"".join(chunks)


async def _http(scope, receive, send):
    path = scope["path"]
    if scope["root_path"] and path.startswith(scope["root_path"]):
        path = path[len(scope["root_path"]):]
    query = parse_qs(scope["query_string"].decode())
    if path.startswith("/scope"):
        shown = {k: v for k, v in scope.items() if k not in ("state", "asgi", "extensions")}
        shown["headers"] = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]]
        shown["raw_path"] = scope["raw_path"].decode("latin-1")
        shown["query_string"] = scope["query_string"].decode("latin-1")
        shown["types"] = {"raw_path": type(scope["raw_path"]).__name__,
                          "query_string": type(scope["query_string"]).__name__,
                          "header": type(scope["headers"][0][0]).__name__ if scope["headers"] else ""}
        shown["asgi"] = scope["asgi"]
        shown["pathsend"] = "http.response.pathsend" in scope.get("extensions", {})
        shown["pid"] = os.getpid()
        await _respond(send, 200, json.dumps(shown).encode(), [(b"x-json", b"1")])
    elif path == "/echo":
        body = await _read_body(receive)
        await _respond(send, 200, body)
    elif path == "/connection":  # answers with the Connection header in ?v=
        await _respond(send, 200, b"told", [(b"connection", query["v"][0].encode())])
    elif path == "/length":  # answers "told" with the Content-Length header in ?v=
        await _respond(send, 200, b"told", [(b"content-length", query["v"][0].encode())])
    elif path == "/stream":
        count = int(query.get("n", ["5"])[0])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(count):
            await send({"type": "http.response.body", "body": b"part%d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/stream-slow":  # a first chunk, then the last one ?s= seconds later
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
        await send({"type": "http.response.body", "body": b"last\n"})
    elif path == "/stream-echo":
        # echo each body chunk as it arrives: request and response both stream
        await send({"type": "http.response.start", "status": 200, "headers": []})
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message["body"])
            if message["body"]:
                await send({"type": "http.response.body", "body": message["body"], "more_body": True})
            if not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b""})
    elif path == "/count":
        # reads the body slowly: flow control keeps the server's buffer small
        total = 0
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            await asyncio.sleep(0.001)
            if not message.get("more_body"):
                break
        await _respond(send, 200, str(total).encode())
    elif path == "/big":
        size = int(query.get("mb", ["8"])[0]) * 1024 * 1024
        block = b"x" * 65536
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(size).encode())]})
        for _ in range(size // len(block)):
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/wait-disconnect":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"waiting\n", "more_body": True})
        message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        _mark("disconnect", message["type"])
    elif path == "/slow":
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
        await _respond(send, 200, b"slow done")
    elif path == "/block":
        time.sleep(float(query.get("s", ["5"])[0]))  # blocks the event loop on purpose
        await _respond(send, 200, b"blocked")
    elif path == "/pathsend":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/x-python")]})
        target = os.environ.get("WK_SEND_FILE") if query.get("big") else None
        await send({"type": "http.response.pathsend", "path": target or os.path.abspath(__file__)})
    elif path == "/state":
        await _respond(send, 200, scope.get("state", {}).get("greeting", "no state").encode())
    elif path == "/error":
        raise RuntimeError("boom")
    elif path == "/nothing":
        return
    elif path == "/head-length":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"11")]})
        body = b"" if scope["method"] == "HEAD" else b"hello world"
        await send({"type": "http.response.body", "body": body})
    elif path == "/inject":
        await _respond(send, 200, b"x", [(b"x-bad", b"a\r\nSet-Cookie: stolen=1")])
    elif path == "/no-content":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    else:
        await _respond(send, 200, b"hello")


async def _websocket(scope, receive, send):
    path = scope["path"]
    message = await receive()
    assert message["type"] == "websocket.connect"
    if path == "/ws-reject":
        await send({"type": "websocket.close"})
        return
    if path == "/ws-deny":
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"x-denied", b"yes")]})
        await send({"type": "websocket.http.response.body", "body": b"go away"})
        return
    subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol,
                "headers": [(b"x-ws", b"accepted")]})
    if path == "/ws-close":
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            _mark("ws-disconnect", str(message["code"]))
            return
        if message.get("text") == "close please":
            await send({"type": "websocket.close", "code": 4002, "reason": "as asked"})
            continue
        if message.get("text") == "scope":
            await send({"type": "websocket.send", "text": json.dumps({
                "path": scope["path"], "subprotocols": scope["subprotocols"],
                "scheme": scope["scheme"], "state": "state" in scope})})
            continue
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(scope, receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
