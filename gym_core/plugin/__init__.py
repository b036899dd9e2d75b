"""Plugin machinery: the hook specifications, discovery, registries, start-up and the hook reference."""
