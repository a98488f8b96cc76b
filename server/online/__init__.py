"""The server: settings, the app and its lifespan, the OpenAI-compatible API, the selection runtime, the one
door to vLLM (engine) and the metrics. One request flows HTTP -> api -> tokenize -> selection -> engine -> api.

online imports `server.core`, never `server.lab` (enforced by import-linter, see pyproject.toml)."""
