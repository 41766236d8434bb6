"""``qwenrt tune``: each engine measured on this host, its best settings saved as the host profile."""
