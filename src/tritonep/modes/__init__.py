"""One orchestration module per mode: `layout` (both high-throughput modes), `intranode`,
`internode`, `low_latency`; `contract` is what `Buffer` hands the high-throughput modes."""
