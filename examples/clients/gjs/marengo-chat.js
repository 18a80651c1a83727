#!/usr/bin/gjs
// Chat with marengod from GJS, the way a GNOME Shell extension or a GJS app does: Gio only.
//
//     gjs marengo-chat.js [--session | --address ADDRESS] [--max-tokens N] [--json-schema] PROMPT
//
// Streams the answer to stdout as it is generated (Chat, then the Token signals until
// Finished) and writes `finished: REASON` to stderr at the end. Ctrl-C asks the service to
// cancel (Cancel) and exits once its Finished says so. With --json-schema the answer is
// constrained to a small JSON object (the option json_schema) and parsed here.

const {Gio, GLib} = imports.gi;
const System = imports.system;

const BUS_NAME = 'org.marengo.Llm1';
const OBJECT_PATH = '/org/marengo/Llm1';
const INTERFACE = 'org.marengo.Llm1';
const SIGINT = 2;

// One of a few labels, as an app that sorts messages would ask for it.
const SENTIMENT_SCHEMA = {
    type: 'object',
    properties: {sentiment: {enum: ['positive', 'negative', 'neutral']}},
    required: ['sentiment'],
    additionalProperties: false,
};

function parseArgs(argv) {
    const args = {address: null, session: false, maxTokens: 256, jsonSchema: false, prompt: null};
    for (let i = 0; i < argv.length; i++) {
        switch (argv[i]) {
        case '--address': args.address = argv[++i]; break;
        case '--session': args.session = true; break;
        case '--max-tokens': args.maxTokens = parseInt(argv[++i], 10); break;
        case '--json-schema': args.jsonSchema = true; break;
        default: args.prompt = argv[i];
        }
    }
    if (args.prompt === null || Number.isNaN(args.maxTokens)) {
        printerr('usage: marengo-chat.js [--session | --address ADDRESS] [--max-tokens N] ' +
            '[--json-schema] PROMPT');
        System.exit(2);
    }
    return args;
}

function connect(args) {
    if (args.address !== null) {
        return Gio.DBusConnection.new_for_address_sync(args.address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT |
            Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, null, null);
    }
    return Gio.bus_get_sync(args.session ? Gio.BusType.SESSION : Gio.BusType.SYSTEM, null);
}

const stdout = new Gio.DataOutputStream({
    base_stream: new Gio.UnixOutputStream({fd: 1, close_fd: false}),
});

function main(argv) {
    const args = parseArgs(argv);
    const connection = connect(args);
    const loop = GLib.MainLoop.new(null, false);
    const options = {max_tokens: new GLib.Variant('u', args.maxTokens)};
    let prompt = args.prompt;
    if (args.jsonSchema) {
        // The schema travels as a JSON string; the answer streams like any other.
        options.json_schema = new GLib.Variant('s', JSON.stringify(SENTIMENT_SCHEMA));
        // In the user's turn: some chat templates (Mistral's) refuse a system message.
        prompt = `Answer in JSON with the sentiment of this text: ${prompt}`;
    }
    const messages = [['user', prompt]];

    let request = null;
    let reason = null;
    const early = []; // signals that came before the request's handle was known
    const text = [];
    const handle = (name, parameters) => {
        const [path, value] = parameters.deepUnpack();
        if (path !== request)
            return;
        if (name === 'Token') {
            text.push(value);
            stdout.put_string(value, null);
            stdout.flush(null);
        } else if (name === 'Finished') {
            reason = value;
            loop.quit();
        }
    };
    // Subscribe before calling: the service sends the signals right after its reply.
    connection.signal_subscribe(null, INTERFACE, null, OBJECT_PATH, null,
        Gio.DBusSignalFlags.NONE, (_conn, _sender, _path, _iface, name, parameters) => {
            if (request === null)
                early.push([name, parameters]);
            else
                handle(name, parameters);
        });
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, SIGINT, () => {
        if (request !== null && reason === null) {
            printerr('\ncancelling…');
            // The answer comes as Finished with reason "cancelled"; keep the loop running.
            connection.call(BUS_NAME, OBJECT_PATH, INTERFACE, 'Cancel',
                new GLib.Variant('(o)', [request]), null, Gio.DBusCallFlags.NONE, -1, null, null);
        }
        return GLib.SOURCE_CONTINUE;
    });

    try {
        const reply = connection.call_sync(BUS_NAME, OBJECT_PATH, INTERFACE, 'Chat',
            new GLib.Variant('(a(ss)a{sv})', [messages, options]), new GLib.VariantType('(o)'),
            Gio.DBusCallFlags.NONE, -1, null);
        [request] = reply.deepUnpack();
    } catch (error) {
        // The D-Bus error name (org.marengo.Llm1.Error.*) says what to do; the message, why.
        printerr(`error: ${error.message}`);
        return 1;
    }
    for (const [name, parameters] of early.splice(0))
        handle(name, parameters);
    if (reason === null)
        loop.run();
    stdout.put_string('\n', null);
    stdout.flush(null);
    printerr(`finished: ${reason}`);
    if (reason === 'cancelled')
        return 130;
    if (args.jsonSchema)
        printerr(`sentiment: ${JSON.parse(text.join('')).sentiment}`);
    return reason === 'stop' || reason === 'length' ? 0 : 1;
}

System.exit(main(ARGV));
