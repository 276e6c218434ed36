"""HAProxy's runtime API on its admin socket: one command per connection, its answer as text."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class HAProxyRuntime:
    path: str
    timeout_s: float = 5.0

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(self.path)
            sock.sendall(line.encode() + b"\n")
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")
