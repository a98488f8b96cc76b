"""`/v1/models`, `/health` and `/admin/banks/reload`: what is served, whether it can be, and swapping the banks.

Like vLLM's serving_models (the served model and its LoRA adapters, loaded and unloaded at run time), with prompt
banks where vLLM has adapters.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from server.core.banks import BankError
from server.online.api.errors import ApiError, internal
from server.online.api.protocol import BankCard, ModelCard, ModelIdp, ModelList
from server.online.bank_registry import BankRegistry, BankSet
from server.online.engine import Engine
from server.online.selection_queue import SelectionQueue

logger = logging.getLogger(__name__)


class ModelsServing:
    """The model card, the health verdict and bank reloads; one instance, created in the app lifespan."""

    def __init__(
        self, engine: Engine, model_name: str, model_root: str, banks: BankRegistry, selection: SelectionQueue
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_root = model_root
        self.banks = banks
        self.selection = selection

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.model_name,
            root=self.model_root,
            max_model_len=self.engine.max_model_len,
            idp=bank_cards(self.banks.current),
        )
        return ModelList(data=[card])

    async def unhealthy(self) -> tuple[str, str] | None:
        """None while everything serves; else (why, error code): the engine or the selection worker has died.

        Either is fatal to this process (neither is restarted in it), so /health says so at once: Kubernetes
        stops routing to the pod, and the app's supervisor exits for a restart (see server/online/app.py)."""
        if not await self.engine.is_healthy():
            return "the engine is not serving", "engine_unavailable"
        if self.selection.failed:
            return "prompt selection is not serving", "selection_unavailable"
        return None

    async def reload_banks(self) -> ModelIdp:
        """Load the banks directory again and swap it in whole. 409 if a bank is at fault (damaged, for another
        model, the default bank gone), 500 for anything else; either way the previous banks keep serving."""
        try:
            fresh = await self.banks.reload()
        except BankError as error:
            raise ApiError(
                f"bank reload refused, the previous banks keep serving: {error}",
                HTTPStatus.CONFLICT,
                code="bank_reload_refused",
            ) from error
        except Exception as error:
            logger.exception("bank reload failed, the previous banks keep serving")
            raise internal("bank reload failed, the previous banks keep serving", code="bank_reload_failed") from error
        return bank_cards(fresh)


def bank_cards(bank_set: BankSet) -> ModelIdp:
    """The `idp` part of the model card: the default bank and each bank's shape, prompt names and the results its
    manifest records (a client sees what repair it is getting)."""
    cards = [
        BankCard(name=b.name, k=b.k, m=b.m, prompts=list(b.prompt_names), measured=b.manifest.measured)
        for b in bank_set.banks.values()
    ]
    return ModelIdp(default_bank=bank_set.default, banks=cards)
