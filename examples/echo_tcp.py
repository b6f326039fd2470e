"""A TCP echo server: ``tiamat -k tcp -b 127.0.0.1:9000 examples/echo_tcp.py:handle``.

Any TCP protocol works under ``-k tcp``; tiamat supplies the pre-forked workers, signals,
graceful restarts and liveness.  ``handle`` uses asyncio streams; ``handle_blocking`` is the
same server written with a plain blocking socket, run on a thread pool
(``tiamat -k tcp --threads 8 examples/echo_tcp.py:handle_blocking``).
"""

import asyncio
import os


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"echo server, worker pid %d\n" % os.getpid())
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()


def handle_blocking(sock, addr) -> None:
    sock.sendall(b"echo server, worker pid %d\n" % os.getpid())
    with sock.makefile("rb") as lines:
        for line in lines:
            sock.sendall(line)


app = handle

if __name__ == "__main__" and not os.environ.get("TIAMAT"):

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 9000)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
