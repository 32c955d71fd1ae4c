"""Clients of a running sdtrt server: the library (:class:`Client`); on top of it the generation commands
(cli.py), the AUTOMATIC1111 gateway (a1111_api.py) and the Gradio page (ui.py)."""

from sdtrt.client.client import (
                                 DEFAULT_URLS,
                                 PROTOCOLS,
                                 Client,
                                 JobControl,
                                 Progress,
                                 ServerBusy,
                                 ServerError,
                                 ServerRefused,
                                 ServerUnavailable,
)

__all__ = ["Client", "JobControl", "Progress", "ServerBusy", "ServerError", "ServerRefused", "ServerUnavailable",
           "PROTOCOLS", "DEFAULT_URLS"]
