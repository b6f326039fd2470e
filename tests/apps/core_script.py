"""The original tiamat's worker-script contract: ``run(config)`` returns the app."""

import os


def run(config):
    workers = config.workers

    def app(environ, start_response):
        body = f"run(config) workers={workers} TIAMAT={os.environ.get('TIAMAT')}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app
