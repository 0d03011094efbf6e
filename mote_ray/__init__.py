"""mote-ray: distributed self-alignment (MoTE) for LLMs on Ray.

Importing this package is cheap on purpose: no torch, vllm or ray at import time
(tests/test_imports.py checks it). Heavy modules load inside the functions that need them.
"""

__version__ = "0.1.0"
