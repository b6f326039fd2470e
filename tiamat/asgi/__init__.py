"""The pieces of the ``asgi`` worker class, one job per module.

- :mod:`tiamat.asgi.loop` - choosing the event loop (``--loop``).
- :mod:`tiamat.asgi.adapt` - turning what the app loader returned into one ASGI 3 callable
  (ASGI 2 classes wrapped; WSGI apps run on a thread pool through a2wsgi or asgiref).
- :mod:`tiamat.asgi.state` - what every connection of one worker shares.
- :mod:`tiamat.asgi.http` - the HTTP/1.1 ``asyncio.Protocol`` (fed to the shared HTTP core).
- :mod:`tiamat.asgi.websocket` - WebSocket connections on websockets' sans-I/O protocol;
  :mod:`tiamat.asgi.ws_wsproto` - the same on wsproto (``--ws wsproto``).
- :mod:`tiamat.asgi.lifespan` - the lifespan protocol (startup before serving, shutdown).

Nothing here imports a web framework; frameworks are only ever the user's app.
"""
