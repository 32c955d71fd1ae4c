"""The application layer, on top of everything else: the ``sdtrt`` command line, the tritonserver launcher and
its healer, and the soak test. Nothing below imports from here."""
