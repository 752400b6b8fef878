"""Read a SunSpec device with pysunspec2, the SunSpec Alliance's own client, and print every
model it finds as JSON: {"models": [{"id", "name", "error", "points": {name: value}}]}.

Input (stdin, JSON): {"host", "port", "unit"}. Values are pysunspec2's computed values
(scale factors applied; None for points the device does not implement)."""

import json
import sys

from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP


def plain(v):
    if isinstance(v, (bytes, bytearray)):
        return v.decode(errors="replace")
    return v


def main():
    req = json.load(sys.stdin)
    d = SunSpecModbusClientDeviceTCP(
        slave_id=req["unit"], ipaddr=req["host"], ipport=req["port"], timeout=5
    )
    d.scan()
    out = []
    for mid, models in d.models.items():
        if not isinstance(mid, int):
            continue
        for m in models:
            points = {}
            for name, p in m.points.items():
                try:
                    points[name] = plain(p.cvalue)
                except Exception as e:  # a value pysunspec2 cannot compute is an error
                    points[name] = {"error": str(e)}
            out.append(
                {
                    "id": mid,
                    "name": m.gname,
                    "error": m.error_info or "",
                    "points": points,
                }
            )
    d.close()
    print(json.dumps({"models": out}))


main()
