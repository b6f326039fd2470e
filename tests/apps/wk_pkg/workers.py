"""A user's worker class (``-k wk_pkg.workers:PlainWorker``), written against the documented
base API only: ``listeners``, ``wake_fd``, ``channel``, ``alive``, ``notify_ready``, ``beat``,
``handle_wakeup`` and ``handle_channel``."""

import selectors

from tiamat.workers.base import Worker


class PlainWorker(Worker):
    """Answers every connection with one fixed HTTP response, then closes it."""

    def run(self):
        selector = selectors.DefaultSelector()
        for sock in self.listeners:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, "listener")
        selector.register(self.wake_fd, selectors.EVENT_READ, "wake")
        selector.register(self.channel.sock, selectors.EVENT_READ, "channel")
        body = b"custom worker %d" % self.slot
        response = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body))
        self.notify_ready()
        while self.alive:
            for key, _ in selector.select(0.5):
                if key.data == "listener":
                    try:
                        conn, _ = key.fileobj.accept()
                    except BlockingIOError:
                        continue
                    with conn:
                        conn.settimeout(2)
                        conn.recv(65536)
                        conn.sendall(response)
                elif key.data == "wake":
                    self.handle_wakeup()
                else:
                    self.handle_channel()
            self.beat()


class NotAWorker:
    pass
