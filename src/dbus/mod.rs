//! The D-Bus API `org.marengo.Llm1`: the service object, its options and what it says of
//! itself (`Capabilities`). The names, the
//! errors and the typed client proxy live in the `marengo-client` crate, shared with
//! `marengoctl`, and are re-exported here.
//!
//! This layer only translates between the bus, the [`crate::text`] side (tokenizing, request
//! preparation, what the properties report) and the [`crate::scheduler`]; it never touches
//! tract, tensors or the engine, so nothing it answers by itself maps the weights.
//! `packaging/dbus/org.marengo.Llm1.xml` is the committed introspection of the interface; a
//! test checks that the running service exports exactly that.

mod capabilities;
mod interface;
mod options;
mod request;

pub use capabilities::{FEATURES, STRUCTURED_OUTPUT_FEATURES};
pub use interface::{Llm1, REQUEST_PATH_PREFIX, Streams};
pub use marengo_client::{BUS_NAME, Llm1Error, Llm1Proxy, OBJECT_PATH};
pub use options::{MAX_STOP_STRINGS, OPTIONS, OptionSpec};
