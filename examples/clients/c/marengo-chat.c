/* Chat with marengod from C through the proxy gdbus-codegen makes from
 * packaging/dbus/org.marengo.Llm1.xml (see the Makefile).
 *
 *     marengo-chat [--session | --address ADDRESS] [--max-tokens N] [--json-schema] PROMPT
 *
 * Streams the answer to stdout as it is generated (Chat, then the Token signals until
 * Finished) and writes "finished: REASON" to stderr at the end. Ctrl-C asks the service to
 * cancel (Cancel) and exits once its Finished says so. With --json-schema the answer is
 * constrained to a small JSON object (the option json_schema).
 */

#include <glib-unix.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "marengo-llm1.h"

/* One of a few labels, as an app that sorts messages would ask for it. */
static const char SENTIMENT_SCHEMA[] =
    "{\"type\": \"object\","
    " \"properties\": {\"sentiment\": {\"enum\": [\"positive\", \"negative\", \"neutral\"]}},"
    " \"required\": [\"sentiment\"], \"additionalProperties\": false}";

typedef struct {
    MarengoLlm1 *proxy;
    GMainLoop *loop;
    gchar *request;     /* NULL until Chat has replied */
    GPtrArray *early;   /* (name, parameters) of signals that came before the reply */
    gchar *reason;      /* set by Finished */
} Chat;

static void handle_token(Chat *chat, const gchar *request, const gchar *text)
{
    if (g_strcmp0(request, chat->request) != 0)
        return;
    fputs(text, stdout);
    fflush(stdout);
}

static void handle_finished(Chat *chat, const gchar *request, const gchar *reason)
{
    if (g_strcmp0(request, chat->request) != 0)
        return;
    chat->reason = g_strdup(reason);
    g_main_loop_quit(chat->loop);
}

/* The service sends the signals right after its reply; the generated proxy may deliver one
 * before the reply is read, so such signals wait for the handle in chat->early. */
static void on_token(MarengoLlm1 *proxy, const gchar *request, const gchar *text, Chat *chat)
{
    if (chat->request == NULL)
        g_ptr_array_add(chat->early, g_variant_ref_sink(g_variant_new("(sss)", "Token", request, text)));
    else
        handle_token(chat, request, text);
}

static void on_finished(MarengoLlm1 *proxy, const gchar *request, const gchar *reason,
                        GVariant *stats, Chat *chat)
{
    if (chat->request == NULL)
        g_ptr_array_add(chat->early, g_variant_ref_sink(g_variant_new("(sss)", "Finished", request, reason)));
    else
        handle_finished(chat, request, reason);
}

static gboolean on_sigint(Chat *chat)
{
    if (chat->request != NULL && chat->reason == NULL) {
        fputs("\ncancelling…\n", stderr);
        /* The answer comes as Finished with reason "cancelled"; keep the loop running. */
        marengo_llm1_call_cancel(chat->proxy, chat->request, NULL, NULL, NULL);
    }
    return G_SOURCE_CONTINUE;
}

static int usage(void)
{
    fputs("usage: marengo-chat [--session | --address ADDRESS] [--max-tokens N] [--json-schema] PROMPT\n",
          stderr);
    return 2;
}

int main(int argc, char **argv)
{
    const char *address = NULL, *prompt = NULL;
    gboolean session = FALSE, json_schema = FALSE;
    guint32 max_tokens = 256;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--address") == 0 && i + 1 < argc)
            address = argv[++i];
        else if (strcmp(argv[i], "--session") == 0)
            session = TRUE;
        else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc)
            max_tokens = (guint32) strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--json-schema") == 0)
            json_schema = TRUE;
        else if (argv[i][0] != '-' && prompt == NULL)
            prompt = argv[i];
        else
            return usage();
    }
    if (prompt == NULL || max_tokens == 0)
        return usage();

    g_autoptr(GError) error = NULL;
    g_autoptr(GDBusConnection) connection = NULL;
    if (address != NULL)
        connection = g_dbus_connection_new_for_address_sync(
            address,
            G_DBUS_CONNECTION_FLAGS_AUTHENTICATION_CLIENT | G_DBUS_CONNECTION_FLAGS_MESSAGE_BUS_CONNECTION,
            NULL, NULL, &error);
    else
        connection = g_bus_get_sync(session ? G_BUS_TYPE_SESSION : G_BUS_TYPE_SYSTEM, NULL, &error);
    if (connection == NULL) {
        fprintf(stderr, "error: %s\n", error->message);
        return 3;
    }
    Chat chat = {
        .loop = g_main_loop_new(NULL, FALSE),
        .early = g_ptr_array_new_with_free_func((GDestroyNotify) g_variant_unref),
    };
    chat.proxy = marengo_llm1_proxy_new_sync(connection, G_DBUS_PROXY_FLAGS_DO_NOT_LOAD_PROPERTIES,
                                             "org.marengo.Llm1", "/org/marengo/Llm1", NULL, &error);
    if (chat.proxy == NULL) {
        fprintf(stderr, "error: %s\n", error->message);
        return 3;
    }
    /* Connect before calling: the signals follow the reply at once. */
    g_signal_connect(chat.proxy, "token", G_CALLBACK(on_token), &chat);
    g_signal_connect(chat.proxy, "finished", G_CALLBACK(on_finished), &chat);
    g_unix_signal_add(SIGINT, (GSourceFunc) on_sigint, &chat);

    GVariantBuilder messages, options;
    g_variant_builder_init(&messages, G_VARIANT_TYPE("a(ss)"));
    g_variant_builder_init(&options, G_VARIANT_TYPE_VARDICT);
    g_variant_builder_add(&options, "{sv}", "max_tokens", g_variant_new_uint32(max_tokens));
    g_autofree gchar *content = NULL;
    if (json_schema) {
        /* The schema travels as a JSON string; the answer streams like any other. */
        g_variant_builder_add(&options, "{sv}", "json_schema", g_variant_new_string(SENTIMENT_SCHEMA));
        /* In the user's turn: some chat templates (Mistral's) refuse a system message. */
        content = g_strdup_printf("Answer in JSON with the sentiment of this text: %s", prompt);
    } else {
        content = g_strdup(prompt);
    }
    g_variant_builder_add(&messages, "(ss)", "user", content);
    if (!marengo_llm1_call_chat_sync(chat.proxy, g_variant_builder_end(&messages),
                                     g_variant_builder_end(&options), &chat.request, NULL, &error)) {
        /* The D-Bus error name (org.marengo.Llm1.Error.*) says what to do; the message, why. */
        fprintf(stderr, "error: %s\n", error->message);
        return 1;
    }
    for (guint i = 0; i < chat.early->len; i++) {
        const gchar *name, *request, *value;
        g_variant_get(g_ptr_array_index(chat.early, i), "(&s&s&s)", &name, &request, &value);
        if (strcmp(name, "Token") == 0)
            handle_token(&chat, request, value);
        else
            handle_finished(&chat, request, value);
    }
    if (chat.reason == NULL)
        g_main_loop_run(chat.loop);
    fputs("\n", stdout);
    fflush(stdout);
    fprintf(stderr, "finished: %s\n", chat.reason);
    int status = strcmp(chat.reason, "cancelled") == 0 ? 130
               : strcmp(chat.reason, "stop") == 0 || strcmp(chat.reason, "length") == 0 ? 0
               : 1;
    g_free(chat.reason);
    g_free(chat.request);
    g_ptr_array_unref(chat.early);
    g_object_unref(chat.proxy);
    g_main_loop_unref(chat.loop);
    return status;
}
