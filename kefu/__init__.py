"""kefu: the application shell (settings, CLI, embedded stack launcher)."""
