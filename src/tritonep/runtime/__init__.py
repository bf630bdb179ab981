"""The shared runtime of every mode: topology, streams, host block and waits, memory."""
