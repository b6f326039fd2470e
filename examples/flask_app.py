"""A Flask app served by tiamat: ``tiamat examples/flask_app.py`` (or ``-w 4 flask_app:app``).

Run it directly with ``python examples/flask_app.py`` and Flask's own development server
starts instead; under tiamat, workers see ``TIAMAT=1`` and the app does not bind itself.
"""

import os

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from Flask under tiamat!\n"


@app.get("/hello/<name>")
def hello(name):
    return jsonify(greeting=f"Hello, {name}!", pid=os.getpid(), under_tiamat=bool(os.environ.get("TIAMAT")))


@app.post("/echo")
def echo():
    return jsonify(received=request.get_json(force=True))


if __name__ == "__main__" and not os.environ.get("TIAMAT"):
    app.run(port=int(os.environ.get("PORT", "8000")))
