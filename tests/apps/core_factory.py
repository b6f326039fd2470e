"""App factories: ``core_factory:create_app()`` and ``core_factory:create_app('prod', n=2)``."""


def create_app(mode="default", n=1):
    def app(environ, start_response):
        body = f"factory mode={mode} n={n}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def not_a_factory():
    return 42
