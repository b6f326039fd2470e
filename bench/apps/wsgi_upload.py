"""Reads the whole request body (a 1 MiB upload) and answers with its length."""


def app(environ, start_response):
    stream = environ["wsgi.input"]
    total = 0
    while True:
        data = stream.read(65536)
        if not data:
            break
        total += len(data)
    body = str(total).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
