"""sgdjob: distributed data-parallel SGD for PyTorch over ZeroMQ parameter-server shards.

The package root imports nothing heavy: the operator image installs it without torch or zmq.
"""

__version__ = "0.1.0"
