import gc
import os

from django.http import HttpResponse, JsonResponse
from django.shortcuts import render


class PidMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response["X-Pid"] = str(os.getpid())
        return response


def index(request):
    return HttpResponse("Hello, World!")


def json_view(request):
    return JsonResponse({"message": "Hello, World!", "numbers": list(range(20))})


def page(request):
    return render(request, "page.html", {"title": "items", "items": [f"item {i}" for i in range(30)]})


def collect(request):
    """A full collection, as a long-running worker eventually runs by itself."""
    return HttpResponse(str(gc.collect()))
