"""Only ``app`` (no ``application``): the default lookup falls back to it."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"named app"]


class Holder:
    def __init__(self):
        self.wsgi = app


holder = Holder()
