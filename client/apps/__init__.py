"""The applications on top of the client library: the one ``sdtrt`` command (cli.py; its generation
commands in cli_generate.py), the A1111 gateway, the Gradio page and their guard, ``sdtrt models``, ``sdtrt soak``."""
