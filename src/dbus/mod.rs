//! The D-Bus API `org.marengo.Llm1`: the service object, its errors, its options, and the
//! typed client proxy that `marengoctl` and the tests use.
//!
//! This layer only translates between the bus and the [`crate::scheduler`]; it never touches
//! tract or tensors, and it reaches the model only through [`crate::engine`].
//! `packaging/dbus/org.marengo.Llm1.xml` is the committed introspection of the interface; a
//! test checks that the running service exports exactly that.

mod client;
mod error;
mod interface;
mod options;
mod request;

pub use client::Llm1Proxy;
pub use error::Llm1Error;
pub use interface::{BUS_NAME, Llm1, ModelInfo, OBJECT_PATH, REQUEST_PATH_PREFIX, Streams};
pub use options::{MAX_STOP_STRINGS, RequestOptions};
pub use request::{encode_chat, encode_prompt};
