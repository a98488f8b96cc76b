"""What the online server and the offline lab share, and nothing else: model identity (cards, fingerprints,
resolving a model folder), the prompt-bank format, the selection algorithm and the settings of paths.

core imports neither `server.online` nor `server.lab` (enforced by import-linter, see pyproject.toml)."""
