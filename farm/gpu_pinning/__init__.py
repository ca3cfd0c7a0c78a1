"""Everything about devices: discovery, queue names, pinning a worker process to one device."""
