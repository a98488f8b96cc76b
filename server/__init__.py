"""idp-serve: serve compressed LLMs repaired per request by Inference-time Dynamic Prompting (IDP)."""

__version__ = "0.1.0"
