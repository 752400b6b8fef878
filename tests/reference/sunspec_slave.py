"""A SunSpec device built from pysunspec2's official model definitions, served as a Modbus
TCP slave: the register image is what pysunspec2 encodes for the values given, so a client
that reads it right agrees with the standard, not with our own tables.

Input (stdin, JSON): {"unit": 1, "base": 40000, "models": [{"id": 103, "values": {...}}]}.
Scale-factor points (names ending in _SF) are set first, as raw values; other numbers are
computed values (the scale applied by pysunspec2); strings are set as given. Points left out
are "not implemented". Prints the port it listens on, then serves until killed. FC03 reads,
FC06 and FC16 writes (any address inside a model)."""

import json
import socketserver
import struct
import sys
import threading

import sunspec2.device as device


def build(req):
    words = [0x5375, 0x6E53]
    for spec in req["models"]:
        m = device.Model(model_id=spec["id"])
        values = spec.get("values", {})
        for name, v in values.items():
            if name.endswith("_SF"):
                m.points[name].value = v
        for name, v in values.items():
            if name.endswith("_SF"):
                continue
            if isinstance(v, str):
                m.points[name].value = v
            else:
                m.points[name].cvalue = v
        data = m.get_mb()
        words += list(struct.unpack(">%dH" % (len(data) // 2), data))
    words += [0xFFFF, 0]
    return words


class Image:
    def __init__(self, base, words):
        self.base = base
        self.words = words
        self.lock = threading.Lock()

    def read(self, start, count):
        off = start - self.base
        if off < 0 or off + count > len(self.words):
            return None
        with self.lock:
            return self.words[off : off + count]

    def write(self, start, values):
        off = start - self.base
        if off < 2 or off + len(values) > len(self.words) - 2:
            return False
        with self.lock:
            self.words[off : off + len(values)] = values
        return True


def handler_for(image, unit):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            while True:
                head = recv(sock, 7)
                if not head:
                    return
                tid, pid, length, uid = struct.unpack(">HHHB", head)
                pdu = recv(sock, length - 1)
                if pdu is None:
                    return
                answer = respond(image, pdu)
                sock.sendall(struct.pack(">HHHB", tid, pid, len(answer) + 1, uid) + answer)

    return Handler


def recv(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def respond(image, pdu):
    fc = pdu[0]
    if fc == 3:
        start, count = struct.unpack(">HH", pdu[1:5])
        if not 1 <= count <= 125:
            return bytes([fc | 0x80, 3])
        words = image.read(start, count)
        if words is None:
            return bytes([fc | 0x80, 2])
        return bytes([fc, 2 * count]) + struct.pack(">%dH" % count, *words)
    if fc == 6:
        addr, value = struct.unpack(">HH", pdu[1:5])
        if not image.write(addr, [value]):
            return bytes([fc | 0x80, 2])
        return pdu[:5]
    if fc == 16:
        start, count, nbytes = struct.unpack(">HHB", pdu[1:6])
        values = list(struct.unpack(">%dH" % count, pdu[6 : 6 + nbytes]))
        if not image.write(start, values):
            return bytes([fc | 0x80, 2])
        return bytes([fc]) + struct.pack(">HH", start, count)
    return bytes([fc | 0x80, 1])


def main():
    req = json.load(sys.stdin)
    image = Image(req.get("base", 40000), build(req))
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler_for(image, req.get("unit", 1)))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


main()
