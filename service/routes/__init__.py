"""One APIRouter per file: models, sample, score, health (liveness, readiness, metrics)."""
