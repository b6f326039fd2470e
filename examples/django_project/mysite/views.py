"""Views of the example project: plain, database-backed, and async."""

import asyncio
import os

from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"Hello from Django (pid {os.getpid()})\n", content_type="text/plain")


def visits(request: HttpRequest) -> JsonResponse:
    """Records a visit (POST) and reports them all: a view backed by SQLite.

    The table is created on first use, so the example needs no migrations.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS visit (id INTEGER PRIMARY KEY, name TEXT)")
        if request.method == "POST":
            cursor.execute("INSERT INTO visit (name) VALUES (%s)", [request.POST.get("name", "anonymous")])
        cursor.execute("SELECT name FROM visit ORDER BY id")
        names = [row[0] for row in cursor.fetchall()]
    return JsonResponse({"count": len(names), "names": names})


async def pause(request: HttpRequest) -> JsonResponse:
    """An async view: under ``-k asgi`` it runs on the worker's event loop."""
    await asyncio.sleep(0.01)
    return JsonResponse({"async": True})
