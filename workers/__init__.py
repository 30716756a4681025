"""Process lifecycle: the pre-forking supervisor, the worker processes, and
systemd integration (notify protocol, socket activation)."""
