"""Settings read once at start-up: flags override `IDP_*` environment variables, which override defaults.

Every path the project writes to hangs off `home`, so one variable (`IDP_HOME`) relocates the venv, the models
and the data caches together, and CI can reuse them between runs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".cache" / "idp-serve"


class Settings(BaseSettings):
    """Where things live and how much CPU torch may use; the server adds its own fields on top."""

    model_config = SettingsConfigDict(env_prefix="IDP_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="Root of every cache idp-serve writes.")
    models_dir: Path | None = Field(None, description="Converted and compressed models (default: HOME/models).")
    data_dir: Path | None = Field(None, description="Offline corpora extracted from packages (default: HOME/data).")
    torch_threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads for offline work; 1 by default: on small shared hosts a second "
        "thread mostly contends with the first.",
    )

    @model_validator(mode="after")
    def _derive_dirs(self) -> Settings:
        """Fill the directories that default to folders under `home`."""
        if self.models_dir is None:
            self.models_dir = self.home / "models"
        if self.data_dir is None:
            self.data_dir = self.home / "data"
        return self
