"""The OpenAI-compatible HTTP API: protocol models, routes, serving logic and error mapping (vLLM's layout)."""
