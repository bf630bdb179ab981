"""Internode high-throughput kernels: notify, dispatch, combine (NVLink inside a node, the
device layer's puts between nodes). `regions` lays out their memory; `rings` holds device helpers.
"""
