"""Models: the served checkpoints with their metadata and recorded figures (the ``read`` scope)."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import Scope, requires
from service.deps import JobsDep, SettingsDep
from service.schemas import ERRORS

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[requires(Scope.READ)])


@router.get("/models")
def list_models(settings: SettingsDep, jobs: JobsDep) -> dict:
    """The served checkpoints with their metadata and metrics."""
    models = jobs.catalogue.models(jobs.conn)
    default = settings.default_model or (sorted(models)[0] if models else None)
    return {
        "default": default,
        "models": [{k: v for k, v in models[name].items() if k != "layers"} for name in sorted(models)],
    }


@router.get("/models/{name}", responses=ERRORS)
def get_model(name: str, jobs: JobsDep) -> dict:
    """One served checkpoint, with the layer names accepted for Grad-CAM."""
    return jobs.catalogue.resolve(jobs.conn, name)
