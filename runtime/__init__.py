"""edgeloop device runtime: everything that runs on a device."""
