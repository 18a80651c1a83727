//! The client side of `org.marengo.Llm1`, the API marengod offers on D-Bus: the names, the
//! typed proxy and the errors, shared with the daemon (which serves the same errors) and used
//! by `marengoctl`. It depends on zbus alone, so that a client carries no model code.

pub mod constraint_args;
pub mod defaults;
mod error;
mod proxy;

pub use error::Llm1Error;
pub use proxy::Llm1Proxy;

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "org.marengo.Llm1";
/// The object that carries the interface.
pub const OBJECT_PATH: &str = "/org/marengo/Llm1";
