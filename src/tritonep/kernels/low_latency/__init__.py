"""Low-latency kernels: `dispatch`, `combine`, `clean` (barrier), over `regions` and `sync`."""
