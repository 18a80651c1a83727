#!/usr/bin/python3
"""Chat with marengod from Python, the way a GNOME app does: PyGObject's Gio, no other library.

    marengo_chat.py [--session | --address ADDRESS] [--max-tokens N] [--json-schema] PROMPT

Streams the answer to stdout as it is generated (Chat, then the Token signals until
Finished) and writes `finished: REASON` to stderr at the end. Ctrl-C asks the service to
cancel (Cancel) and exits once its Finished says so. With --json-schema the answer is
constrained to a small JSON object (the option json_schema), parsed and checked here.

Runs with the system interpreter and Debian's python3-gi: /usr/bin/python3 marengo_chat.py
"""

import argparse
import json
import signal
import sys

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.marengo.Llm1"
OBJECT_PATH = "/org/marengo/Llm1"
INTERFACE = "org.marengo.Llm1"

# One of a few labels, as an app that sorts messages would ask for it.
SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["sentiment"],
    "additionalProperties": False,
}


def connect(args):
    if args.address:
        return Gio.DBusConnection.new_for_address_sync(
            args.address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
            | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None,
            None,
        )
    return Gio.bus_get_sync(Gio.BusType.SESSION if args.session else Gio.BusType.SYSTEM, None)


class Chat:
    """One streamed request: its text, its end, and Ctrl-C turned into Cancel."""

    def __init__(self, connection, loop, echo):
        self.connection = connection
        self.loop = loop
        self.echo = echo
        self.request = None
        self.early = []  # signals that came before the request's handle was known
        self.text = []
        self.reason = None
        # Subscribe before calling: the service sends the signals right after its reply.
        self.subscription = connection.signal_subscribe(
            None, INTERFACE, None, OBJECT_PATH, None, Gio.DBusSignalFlags.NONE, self.on_signal
        )
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, self.on_sigint)

    def start(self, messages, options):
        reply = self.connection.call_sync(
            BUS_NAME,
            OBJECT_PATH,
            INTERFACE,
            "Chat",
            GLib.Variant("(a(ss)a{sv})", (messages, options)),
            GLib.VariantType("(o)"),
            Gio.DBusCallFlags.NONE,
            -1,
            None,
        )
        (self.request,) = reply.unpack()
        for name, parameters in self.early:
            self.handle(name, parameters)
        self.early = []

    def on_signal(self, _connection, _sender, _path, _interface, name, parameters):
        if self.request is None:
            self.early.append((name, parameters))
        else:
            self.handle(name, parameters)

    def handle(self, name, parameters):
        request = parameters[0]
        if request != self.request:
            return
        if name == "Token":
            self.text.append(parameters[1])
            if self.echo:
                sys.stdout.write(parameters[1])
                sys.stdout.flush()
        elif name == "Finished":
            self.reason = parameters[1]
            self.loop.quit()

    def on_sigint(self):
        if self.request is not None and self.reason is None:
            print("\ncancelling…", file=sys.stderr, flush=True)
            # The answer comes as Finished with reason "cancelled"; keep the loop running.
            self.connection.call(
                BUS_NAME,
                OBJECT_PATH,
                INTERFACE,
                "Cancel",
                GLib.Variant("(o)", (self.request,)),
                None,
                Gio.DBusCallFlags.NONE,
                -1,
                None,
                None,
            )
        return GLib.SOURCE_CONTINUE


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--session", action="store_true", help="the session bus (default: system)")
    bus.add_argument("--address", help="the bus at this D-Bus address")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json-schema", action="store_true", help="answer as a JSON object")
    parser.add_argument("prompt")
    args = parser.parse_args()

    connection = connect(args)
    loop = GLib.MainLoop()
    options = {"max_tokens": GLib.Variant("u", args.max_tokens)}
    prompt = args.prompt
    if args.json_schema:
        # The schema travels as a JSON string; the answer streams like any other.
        options["json_schema"] = GLib.Variant("s", json.dumps(SENTIMENT_SCHEMA))
        # In the user's turn: some chat templates (Mistral's) refuse a system message.
        prompt = f"Answer in JSON with the sentiment of this text: {prompt}"
    messages = [("user", prompt)]
    chat = Chat(connection, loop, echo=True)
    try:
        chat.start(messages, options)
    except GLib.Error as error:
        # The D-Bus error name (org.marengo.Llm1.Error.*) says what to do; the message, why.
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    if chat.reason is None:
        loop.run()
    print(file=sys.stdout, flush=True)
    print(f"finished: {chat.reason}", file=sys.stderr, flush=True)
    if chat.reason == "cancelled":
        return 130
    if args.json_schema:
        answer = json.loads("".join(chat.text))
        print(f"sentiment: {answer['sentiment']}", file=sys.stderr)
    return 0 if chat.reason in ("stop", "length") else 1


if __name__ == "__main__":
    sys.exit(main())
