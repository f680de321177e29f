"""POST /api/v1/models/{name}/predict (built in the next change)."""

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1")
