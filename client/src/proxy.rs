//! The client side of `org.marengo.Llm1`, generated from the same method list as the service.

use std::collections::HashMap;

use zbus::{ObjectPath, OwnedObjectPath, OwnedVariant, Variant, proxy};

use crate::Llm1Error;

/// Calls on `org.marengo.Llm1`. The streaming calls answer with a request handle; subscribe
/// to `Token`/`Finished` (`receive_token`, `receive_finished`) before calling them.
#[proxy(
    interface = "org.marengo.Llm1",
    default_service = "org.marengo.Llm1",
    default_path = "/org/marengo/Llm1"
)]
pub trait Llm1 {
    fn generate(
        &self,
        prompt: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, Llm1Error>;

    fn chat(
        &self,
        messages: &[(&str, &str)],
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<OwnedObjectPath, Llm1Error>;

    fn complete(
        &self,
        prompt: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> Result<(String, HashMap<String, OwnedVariant>), Llm1Error>;

    fn cancel(&self, request: &ObjectPath<'_>) -> Result<(), Llm1Error>;

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, Llm1Error>;

    fn detokenize(&self, tokens: &[u32]) -> Result<String, Llm1Error>;

    #[zbus(signal)]
    fn token(&self, request: ObjectPath<'_>, text: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    fn finished(
        &self,
        request: ObjectPath<'_>,
        reason: &str,
        stats: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;

    /// What the daemon accepts and offers: `options`, `limits`, `features`. Never cached: the
    /// limits are the default model's, which can change while the service runs.
    #[zbus(property(emits_changed_signal = "false"))]
    fn capabilities(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;

    /// The default model; empty without one. Never cached: a model installed while the
    /// service runs can become the default.
    #[zbus(property(emits_changed_signal = "false"))]
    fn model(&self) -> zbus::Result<String>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn context_length(&self) -> zbus::Result<u32>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn quantization(&self) -> zbus::Result<String>;

    /// (name, quantization, context length, size in bytes), the default first.
    #[zbus(property(emits_changed_signal = "false"))]
    fn models(&self) -> zbus::Result<Vec<(String, String, u32, u64)>>;

    #[zbus(property(emits_changed_signal = "false"))]
    fn loaded_model(&self) -> zbus::Result<String>;

    /// no-model, unloaded, loading, idle or generating.
    #[zbus(property(emits_changed_signal = "false"))]
    fn state(&self) -> zbus::Result<String>;

    /// Never cached: the service does not announce its changes.
    #[zbus(property(emits_changed_signal = "false"))]
    fn queue_length(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}
