//! The D-Bus API `org.marengo.Llm1`: the service object and its options. The names, the
//! errors and the typed client proxy live in the `marengo-client` crate, shared with
//! `marengoctl`, and are re-exported here.
//!
//! This layer only translates between the bus and the [`crate::scheduler`]; it never touches
//! tract or tensors, and it reaches the model only through [`crate::engine`].
//! `packaging/dbus/org.marengo.Llm1.xml` is the committed introspection of the interface; a
//! test checks that the running service exports exactly that.

mod interface;
mod options;
mod request;

pub use interface::{Llm1, ModelInfo, REQUEST_PATH_PREFIX, Streams};
pub use marengo_client::{BUS_NAME, Llm1Error, Llm1Proxy, OBJECT_PATH};
pub use options::{MAX_STOP_STRINGS, RequestOptions};
pub use request::{encode_chat, encode_prompt};
