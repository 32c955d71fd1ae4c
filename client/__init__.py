"""Clients of a running sdtrt server: the library (:class:`Client`) and, later, the Gradio page."""

from sdtrt.client.client import DEFAULT_URLS, PROTOCOLS, Client, ServerBusy, ServerError

__all__ = ["Client", "ServerBusy", "ServerError", "PROTOCOLS", "DEFAULT_URLS"]
