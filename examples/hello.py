"""The smallest WSGI app: ``tiamat examples/hello.py`` serves it on http://127.0.0.1:8000."""

import os


def application(environ, start_response):
    body = b"Hello, World!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = application

if __name__ == "__main__" and not os.environ.get("TIAMAT"):
    from wsgiref.simple_server import make_server

    make_server("127.0.0.1", 8000, application).serve_forever()
