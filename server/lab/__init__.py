"""The offline lab: convert the embedded model, compress it, read corpora and tasks, train prompt banks,
evaluate and analyse the repair. Nothing here runs in the server.

lab imports `server.core`, never `server.online` (enforced by import-linter, see pyproject.toml)."""
