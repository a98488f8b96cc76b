"""The prompt banks a server serves: loaded and verified from the banks directory, held as one immutable set,
swapped whole on reload.

The banks, one selector per bank and the default bank form a `BankSet`. A request reads the current set once,
when it plans, and carries the bank and selector it planned with to the end; a reload builds a whole new set off
the event loop and swaps the reference in one assignment. So every request sees the old set or the new one, never
a mix, and a set that fails to load is never swapped in (the old one keeps serving).

Faults of the banks themselves (a damaged or foreign bank, a configured default bank that is gone, an explicitly
configured banks directory without a bank) are `BankError`s: the operator's to fix, refused with a message
naming the bank and the problem. Anything else raised while loading is a fault of this server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from server.core.banks import MANIFEST_FILE, BankError, PromptBank, list_banks, load_bank
from server.core.identity import Fingerprint, fingerprint
from server.core.selection import bank_selector, load_selection_model
from server.online import metrics
from server.online.selection_queue import Selector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankSet:
    """The loaded banks with one selector each and the default bank: swapped whole on reload, never edited."""

    banks: Mapping[str, PromptBank]
    selectors: Mapping[str, Selector]
    default: str | None


def require_banks(banks_dir: Path) -> None:
    """BankError unless `banks_dir` holds at least one bank folder.

    For a banks directory the operator named explicitly: one without a bank means the deployment is wrong (a
    volume not mounted, a path mistyped), and serving with IDP silently off would hide it behind a Ready pod."""
    if list_banks(banks_dir):
        return
    why = "does not exist" if not Path(banks_dir).is_dir() else "holds no bank (no folder with a bank.json)"
    raise BankError(
        f"banks directory {banks_dir} was set explicitly (IDP_BANKS_DIR / --banks-dir) but {why}; "
        "put the banks there, or leave the setting out to serve the project's own banks"
    )


def load_banks(banks_dir: Path, model: Fingerprint, allow_weights_mismatch: bool = False) -> dict[str, PromptBank]:
    """Every bank under `banks_dir`, verified against the served model (BankError names the one at fault)."""
    return {
        name: load_bank(banks_dir / name, expect=model, allow_weights_mismatch=allow_weights_mismatch)
        for name in list_banks(banks_dir)
    }


def choose_default_bank(requested: str | None, banks: Mapping[str, PromptBank]) -> str | None:
    """The configured default bank (which must exist), else the first by name, else None (IDP off by default)."""
    if requested is not None and requested not in banks:
        raise BankError(f"default bank {requested!r} is not among the loaded banks {sorted(banks)}")
    return requested or next(iter(sorted(banks)), None)


class BankLoader:
    """Builds a verified `BankSet` from the banks directory: at start-up and on every reload.

    The selection model is loaded once, on the first non-empty bank set, and kept: it is the served model's, which
    does not change while serving, and loading it is the slow part. Calls are serialized by their callers (start-up
    runs once; `BankRegistry` serializes reloads). The banks' metrics describe the set last built: the banks of a
    set are described only once the whole set loaded, and the series of banks (and prompts) that a new set no
    longer has are removed, so a dashboard never shows a bank that is not serving.
    """

    def __init__(
        self,
        folder: Path,
        banks_dir: Path,
        default_bank: str | None,
        layers: list[int] | None,
        device: str,
        required: bool = False,
        allow_weights_mismatch: bool = False,
    ) -> None:
        """`required`: the banks directory was named explicitly, so an empty one is refused (`require_banks`);
        `allow_weights_mismatch`: load banks trained on other weights with a warning (`load_bank`)."""
        self._folder = folder
        self._device = device
        self._expect = fingerprint(folder)
        self._banks_dir = banks_dir
        self._default_bank = default_bank
        self._layers = layers
        self._required = required
        self._allow_weights_mismatch = allow_weights_mismatch
        self._model: PreTrainedModel | None = None
        self._described: list[PromptBank] = []

    def __call__(self) -> BankSet:
        """Every bank verified, the default resolved, one cached selector per bank; BankError naming a fault
        (counted in `idp_bank_load_failures`)."""
        try:
            if self._required:
                require_banks(self._banks_dir)
            banks = load_banks(self._banks_dir, self._expect, self._allow_weights_mismatch)
            default = choose_default_bank(self._default_bank, banks)
        except BankError:
            metrics.bank_load_failed()
            raise
        if banks and self._model is None:
            self._model = load_selection_model(self._folder, self._device)
        selectors = {name: self._selector(name, bank) for name, bank in banks.items()}
        metrics.banks_replaced(self._described, list(banks.values()))
        self._described = list(banks.values())
        return BankSet(banks, selectors, default)

    def _selector(self, name: str, bank: PromptBank) -> Selector:
        """The bank's selector under its manifest's rule (or the `selection_layers` override); a rule that does not
        fit the served model is the bank's fault (BankError naming its manifest), counted like any other."""
        try:
            return bank_selector(self._model, bank, self._layers or None)
        except ValueError as error:
            metrics.bank_load_failed()
            raise BankError(f"{self._banks_dir / name / MANIFEST_FILE}: {error}") from None


class BankRegistry:
    """The bank set now serving, and its reload; created in the app lifespan, read by every request."""

    def __init__(self, loader: BankLoader, initial: BankSet) -> None:
        """`loader` builds a fresh, verified BankSet from disk (blocking; `reload` runs it off the loop)."""
        self.current = initial
        self._loader = loader
        self._lock = asyncio.Lock()

    async def reload(self) -> BankSet:
        """Load the banks directory again and swap it in whole. On any error the previous set keeps serving and
        the error is raised: a BankError is the banks' fault (logged here, as a warning naming it), anything else
        is a fault of this server (the caller logs it with its traceback).

        Reloads are serialized so two concurrent ones cannot finish out of order and leave the older set in place.
        """
        async with self._lock:
            try:
                fresh = await asyncio.to_thread(self._loader)
            except BankError as error:
                logger.warning("bank reload refused, the previous banks keep serving: %s", error)
                raise
            self.current = fresh
        logger.info("banks reloaded: %s (default %s)", sorted(fresh.banks), fresh.default)
        return fresh
