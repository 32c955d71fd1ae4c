"""Serving a repository: the tritonserver launcher, its watchdog and healer, and the control key."""
