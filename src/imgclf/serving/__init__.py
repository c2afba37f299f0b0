"""Serving: the endpoint handler (inference.py), its MMS adapter (handler_service.py) and the
image's `serve` entry (serve.py)."""
