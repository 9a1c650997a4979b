"""A Modbus slave built on pymodbus, for interop runs of gatewayd's Modbus tests.

Serves the units of a register map file (the JSON format of `device-fixtures modbus`; clamps
are not simulated) over Modbus TCP on 127.0.0.1, over RTU frames on TCP, and over Modbus RTU
on a pseudo-terminal pair: pymodbus opens one end, `--link` points at the other (a relay
thread copies bytes between the two masters, like a null-modem cable). Prints one JSON line
{"tcp": "127.0.0.1:PORT", "rtu_tcp": "127.0.0.1:PORT", "link": PATH} once all listen, then
serves until SIGTERM.
"""

import argparse
import asyncio
import json
import os
import select
import signal
import sys
import threading
import tty

from pymodbus import FramerType
from pymodbus.datastore import (
    ModbusServerContext,
    ModbusSlaveContext,
    ModbusSparseDataBlock,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer


def expand(table):
    """Addresses (or a-b ranges) to values; pymodbus data blocks count from 1."""
    out = {}
    for key, value in table.items():
        lo, _, hi = key.partition("-")
        for address in range(int(lo), int(hi or lo) + 1):
            out[address + 1] = int(value) if not isinstance(value, bool) else value
    return out


def context(map_file):
    with open(map_file, encoding="utf-8") as f:
        units = json.load(f)["units"]
    slaves = {}
    for unit, tables in units.items():
        slaves[int(unit)] = ModbusSlaveContext(
            co=ModbusSparseDataBlock(expand(tables.get("coils", {}))),
            di=ModbusSparseDataBlock(expand(tables.get("discrete_inputs", {}))),
            ir=ModbusSparseDataBlock(expand(tables.get("input_registers", {}))),
            hr=ModbusSparseDataBlock(expand(tables.get("holding_registers", {}))),
        )
    return ModbusServerContext(slaves=slaves, single=False)


def null_modem():
    """Two pty pairs whose masters are relayed: returns the two slave paths."""
    a_master, a_slave = os.openpty()
    b_master, b_slave = os.openpty()
    for fd in (a_slave, b_slave):
        tty.setraw(fd)
    # The slave fds stay open so a master never reads EIO while nobody has its slave open.
    keep = (a_slave, b_slave)

    def relay():
        peers = {a_master: b_master, b_master: a_master}
        while True:
            ready, _, _ = select.select(list(peers), [], [])
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if data:
                    os.write(peers[fd], data)

    threading.Thread(target=relay, daemon=True).start()
    return os.ttyname(a_slave), os.ttyname(b_slave), keep


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--map", required=True)
    parser.add_argument("--link", required=True)
    args = parser.parse_args()
    ctx = context(args.map)

    tcp = ModbusTcpServer(ctx, address=("127.0.0.1", 0))
    await tcp.serve_forever(background=True)
    port = tcp.transport.sockets[0].getsockname()[1]
    rtu_tcp = ModbusTcpServer(ctx, framer=FramerType.RTU, address=("127.0.0.1", 0))
    await rtu_tcp.serve_forever(background=True)
    rtu_port = rtu_tcp.transport.sockets[0].getsockname()[1]

    ours, theirs, _keep = null_modem()
    if os.path.lexists(args.link):
        os.remove(args.link)
    os.symlink(theirs, args.link)
    rtu = ModbusSerialServer(ctx, port=ours, baudrate=115200)
    await rtu.serve_forever(background=True)

    print(
        json.dumps(
            {
                "tcp": f"127.0.0.1:{port}",
                "rtu_tcp": f"127.0.0.1:{rtu_port}",
                "link": args.link,
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await tcp.shutdown()
    await rtu_tcp.shutdown()
    await rtu.shutdown()
    os.remove(args.link)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
