"""A free TCP port on localhost, for the rendezvous of tests that start 2 gloo ranks.

The port is free when returned, not reserved: under pytest-xdist these tests share the `two_ranks`
xdist_group (`--dist loadgroup` runs them one after another on one worker), so no two rendezvous race."""
import socket


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
