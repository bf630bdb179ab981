"""One orchestration module per mode: `layout` (both high-throughput modes), `intranode`,
`low_latency`."""
