"""Dependencies the routes declare with ``Annotated``: the settings (read once, when the app
is built) and the job service on the app's Redis connection."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from jobs.settings import Settings
from service.jobs import JobService


# Coroutines: FastAPI runs a plain function dependency in its thread pool (a hop per request).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
