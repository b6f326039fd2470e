"""An app that would start its own server unless it runs under tiamat (TIAMAT=1)."""

import os

from core_named_app import app

if not os.environ.get("TIAMAT"):
    raise SystemExit("TIAMAT is not set: the app would bind its own server here")

application = app
