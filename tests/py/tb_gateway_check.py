"""A gateway built on ThingsBoard's official Python client (tb-mqtt-client), for checking the
ThingsBoard emulator against an implementation nobody here wrote.

Connects to HOST:PORT with the gateway's access token, connects DEVICE (of TYPE), listens for
attribute updates and server-side RPCs (every RPC is answered with
{"ok": true, "echo": params}), then follows commands read one per line on stdin:

  send        send client attributes and telemetry for DEVICE, then request shared attribute KEY
  disconnect  disconnect DEVICE from the gateway
  quit        disconnect the client and exit (also on end of input)

Every event is printed as one JSON line on stdout, flushed at once:
{"event": "connected"}, {"event": "attribute_update", "content": ...},
{"event": "rpc", "content": ...}, {"event": "attributes_response", "content": ...},
{"event": "sent"}, {"event": "device_disconnected"}, {"event": "error", "error": ...}.
"""

import argparse
import json
import logging
import sys
import threading
import time

from tb_gateway_mqtt import TBGatewayMqttClient

_print_lock = threading.Lock()


def emit(event, **fields):
    with _print_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--device", default="Sensor-1")
    parser.add_argument("--type", default="thermo")
    parser.add_argument("--key", default="target", help="shared attribute to request")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )

    client = TBGatewayMqttClient(args.host, args.port, username=args.token)

    def on_attributes(content, *_):
        emit("attribute_update", content=content)

    def on_rpc(gateway, content):
        emit("rpc", content=content)
        data = content.get("data", {})
        gateway.gw_send_rpc_reply(
            content["device"], data.get("id"), {"ok": True, "echo": data.get("params")}
        )

    def on_response(content, error, *_):
        if error is not None:
            emit("error", error=str(error))
        else:
            emit("attributes_response", content=content)

    client.gw_set_server_side_rpc_request_handler(on_rpc)
    client.connect(keepalive=30)
    deadline = time.monotonic() + 20
    while not client.is_connected():
        if time.monotonic() > deadline:
            emit("error", error="not connected within 20 s")
            return 1
        time.sleep(0.01)
    client.gw_connect_device(args.device, args.type).get()
    client.gw_subscribe_to_all_attributes(on_attributes)
    emit("connected")

    for line in sys.stdin:
        command = line.strip()
        if command == "send":
            client.gw_send_attributes(args.device, {"firmware": "1.2.3", "serial": 42}).get()
            client.gw_send_telemetry(
                args.device, [{"ts": 1700000000000, "values": {"temperature": 21.5}}]
            ).get()
            client.gw_send_telemetry(args.device, {"humidity": 40}).get()
            client.gw_request_shared_attributes(args.device, [args.key], on_response)
            emit("sent")
        elif command == "disconnect":
            client.gw_disconnect_device(args.device).get()
            emit("device_disconnected")
        elif command == "quit":
            break
        elif command:
            emit("error", error=f"unknown command {command!r}")
    client.disconnect()
    client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
