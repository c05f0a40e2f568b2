"""A free TCP port on localhost, for the rendezvous of tests that start 2 gloo ranks."""
import socket


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
