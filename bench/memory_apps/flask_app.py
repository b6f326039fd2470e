"""Flask app for bench/memory.py: a text page, JSON and a rendered template (X-Pid header)."""

import gc
import os

from flask import Flask, jsonify, render_template_string

app = Flask(__name__)
PAGE = """<!doctype html><title>{{ title }}</title><ul>{% for item in items %}
<li>{{ loop.index }}: {{ item|title }}</li>{% endfor %}</ul>"""


@app.after_request
def add_pid(response):
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.get("/")
def index():
    return "Hello, World!"


@app.get("/json")
def json_view():
    return jsonify(message="Hello, World!", numbers=list(range(20)))


@app.get("/page")
def page():
    return render_template_string(PAGE, title="items", items=[f"item {i}" for i in range(30)])


@app.get("/gc")
def collect():
    """A full collection, as a long-running worker eventually runs by itself."""
    return str(gc.collect())
