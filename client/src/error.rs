//! The errors of `org.marengo.Llm1`, each a stable D-Bus error name under
//! `org.marengo.Llm1.Error` so that clients can branch on the name, not on the message.

use zbus::DBusError;

/// A failed call on `org.marengo.Llm1`. The message always names what was wrong (the option
/// key, the prompt length, the request path) so that a shell user can act on it.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.marengo.Llm1.Error")]
pub enum Llm1Error {
    /// A failure of the bus itself, seen by clients (not an error of the service).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An option key is unknown, has the wrong type or is out of range.
    InvalidOption(String),
    /// An argument other than the options is unusable: no chat messages, a role the chat
    /// template refuses, a token id outside the vocabulary.
    InvalidArgument(String),
    /// The prompt does not leave room for one generated token in the model's context.
    ContextOverflow(String),
    /// The queue is full, overall or for this client; retry later.
    Busy(String),
    /// No such request, or it has already finished.
    NotFound(String),
    /// The request belongs to another client.
    AccessDenied(String),
    /// No model is installed (or the configured default is not): the message says where the
    /// daemon looked and how to install one.
    NoModel(String),
    /// The model failed; the message says how. The daemon keeps running.
    Internal(String),
}
