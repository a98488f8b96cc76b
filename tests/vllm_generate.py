"""Moved to tests/helpers.py (`vllm_generate`); this name stays importable until test_compress.py switches."""

from tests.helpers import vllm_generate as generate

__all__ = ["generate"]
