"""A Starlette app whose lifespan startup raises (Starlette reports the whole traceback)."""

from contextlib import asynccontextmanager

from starlette.applications import Starlette


@asynccontextmanager
async def lifespan(app):
    raise RuntimeError("no database at db:5432")
    yield


app = Starlette(lifespan=lifespan)
