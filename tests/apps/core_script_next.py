"""The ``run(config, next)`` form: the script hands the app to ``next``."""


def run(config, next):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "8")])
        return [b"via next"]

    next(app)
