//! `org.marengo.Llm1`: the one struct that is the daemon's D-Bus surface.
//!
//! Methods check their arguments, choose the model ([`Models`]), prepare an engine request on
//! its [`TextSide`] off the async runtime and hand it to the [`Scheduler`]; a task per streaming request then forwards its text as
//! `Token` signals and its end as one `Finished`. Every signal carries the caller's unique
//! name as destination: on a system bus any user may add match rules, and a broadcast stream
//! would show one user's conversation to all the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::{ResponseDispatchListener, ResponseDispatchNotifier, SignalEmitter};
use zbus::{Connection, ObjectPath, OwnedObjectPath, OwnedVariant, Variant, interface};

use super::capabilities::{self, Limits};
use super::request::{self, BusPrompt};
use super::{Llm1Error, OBJECT_PATH};
use crate::models::{ModelInfo, Models, ModelsError};
use crate::request::RequestOptions;
use crate::scheduler::{CancelError, Event, RequestEnd, RequestId, Scheduler, SubmitError};
use crate::text::TextSide;
use crate::tokenizer::TokenizerError;

/// Request handles are `REQUEST_PATH_PREFIX` + a decimal number. They name requests, they
/// are not objects one can call.
pub const REQUEST_PATH_PREFIX: &str = "/org/marengo/Llm1/request/";

/// Text pieces buffered per request between the generation thread and the bus. When the bus
/// is slower than generation the thread waits: memory stays bounded.
const EVENT_BUFFER: usize = 256;

/// Counts the tasks still forwarding a stream, so that a shutdown can wait for the last
/// `Finished` to be sent before the process exits.
#[derive(Debug, Default)]
pub struct Streams {
    active: AtomicUsize,
    ended: Notify,
}

impl Streams {
    /// Returns once no stream is being forwarded.
    pub async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }

    fn begin(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }
}

struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// What the `State` property says, from the models found and the scheduler's snapshot.
pub mod state {
    /// No model is installed (or the configured default is missing); generation fails with
    /// `NoModel`.
    pub const NO_MODEL: &str = "no-model";
    /// Models are installed, none is resident; the next generation loads one.
    pub const UNLOADED: &str = "unloaded";
    /// A model's weights are being loaded.
    pub const LOADING: &str = "loading";
    /// A model is resident (`LoadedModel`) and nothing runs.
    pub const IDLE: &str = "idle";
    /// A request is being generated.
    pub const GENERATING: &str = "generating";
}

/// The service object. The models' text sides answer tokenizing and the properties, and
/// prepare requests; only the scheduler's worker runs (and may load) the weights.
pub struct Llm1 {
    scheduler: Arc<Scheduler>,
    models: Arc<Models>,
    default_max_tokens: u32,
    streams: Arc<Streams>,
    limits: Limits,
}

impl Llm1 {
    pub fn new(
        scheduler: Arc<Scheduler>,
        models: Arc<Models>,
        default_max_tokens: u32,
        streams: Arc<Streams>,
    ) -> Self {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let limits = Limits {
            // The default model's, filled in when the property is read: it can change.
            context_length: 0,
            default_max_tokens,
            queue_capacity: count(scheduler.options().queue_capacity),
            max_queued_per_client: count(scheduler.options().max_queued_per_client),
            parallel: count(scheduler.options().parallel),
            kv_memory_mib: u32::try_from(scheduler.options().kv_budget >> 20).unwrap_or(u32::MAX),
        };
        Self {
            scheduler,
            models,
            default_max_tokens,
            streams,
            limits,
        }
    }

    /// Validates and queues a request; its events arrive on the returned receiver, with the
    /// name of the model that runs it.
    async fn submit(
        &self,
        client: &str,
        prompt: BusPrompt,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<(RequestId, String, mpsc::Receiver<Event>), Llm1Error> {
        let options = RequestOptions::parse(options)?;
        let models = Arc::clone(&self.models);
        let default_max_tokens = self.default_max_tokens;
        let (text, request) = blocking(move || {
            let text = model_text(&models, options.model.as_deref())?;
            let request = request::prepare(&text, prompt, options, default_max_tokens)?;
            Ok((text, request))
        })
        .await?;
        let model = text.model_name().to_owned();
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let id = self
            .scheduler
            .submit(client, text, request, events)
            .map_err(|e| match e {
                SubmitError::ShuttingDown => Llm1Error::Internal(e.to_string()),
                SubmitError::QueueFull(_) | SubmitError::ClientQueueFull(_) => {
                    Llm1Error::Busy(e.to_string())
                }
            })?;
        tracing::debug!(client, request = id, model, "request queued");
        Ok((id, model, receiver))
    }

    /// Queues a streaming request and starts forwarding its events once the reply (the
    /// request's path) has been sent, so that a client never sees a `Token` before the path
    /// that identifies it.
    async fn stream(
        &self,
        header: &Header<'_>,
        connection: &Connection,
        prompt: BusPrompt,
        options: &HashMap<String, OwnedVariant>,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, Llm1Error> {
        let client = caller(header)?;
        let (id, model, events) = self.submit(&client, prompt, options).await?;
        let path = request_path(id);
        let (reply, sent) = ResponseDispatchNotifier::new(path.clone());
        let emitter = SignalEmitter::new(connection, OBJECT_PATH)
            .map_err(internal)?
            .set_destination(BusName::try_from(client).map_err(internal)?)
            .into_owned();
        let guard = self.streams.begin();
        tokio::spawn(forward(emitter, path, model, sent, events, guard));
        Ok(reply)
    }
}

#[interface(name = "org.marengo.Llm1")]
impl Llm1 {
    /// Starts generating a continuation of `prompt` and returns the request's handle.
    /// The text arrives as Token signals and the end as one Finished signal, sent to the
    /// caller only; subscribe to them before calling. The options, their types, defaults and
    /// ranges are in Capabilities, among them at most one of json_schema, regex and grammar:
    /// the text then ends (reason "stop") when its match is complete, and one that does not
    /// compile is refused with InvalidOption. Integers of any width are accepted where they fit.
    #[zbus(out_args("request"))]
    async fn generate(
        &self,
        prompt: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, Llm1Error> {
        self.stream(&header, connection, BusPrompt::Text(prompt), &options)
            .await
    }

    /// Like Generate, for a conversation: messages are (role, content) pairs, rendered with
    /// the model's own chat template.
    #[zbus(out_args("request"))]
    async fn chat(
        &self,
        messages: Vec<(String, String)>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, Llm1Error> {
        self.stream(&header, connection, BusPrompt::Chat(messages), &options)
            .await
    }

    /// Generates and returns the whole text at once, for scripts. The stats are those of
    /// Finished, with the reason under "reason".
    #[zbus(out_args("text", "stats"))]
    async fn complete(
        &self,
        prompt: String,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(String, HashMap<String, OwnedVariant>), Llm1Error> {
        let client = caller(&header)?;
        let (_, model, mut events) = self
            .submit(&client, BusPrompt::Text(prompt), &options)
            .await?;
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Text(piece) => text.push_str(&wire_text(&piece)),
                Event::Finished(finished) => {
                    if let Some(error) = &finished.error {
                        return Err(Llm1Error::Internal(error.clone()));
                    }
                    return Ok((text, owned(stats(&finished, &model))?));
                }
            }
        }
        Err(Llm1Error::Internal(
            "the generation ended without a result".into(),
        ))
    }

    /// Stops a request of the caller's: a waiting one at once, a running one before its
    /// next token. Its Finished signal says "cancelled".
    async fn cancel(
        &self,
        request: ObjectPath<'_>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Llm1Error> {
        let client = caller(&header)?;
        let id = request
            .as_str()
            .strip_prefix(REQUEST_PATH_PREFIX)
            .and_then(|n| n.parse::<RequestId>().ok())
            .ok_or_else(|| Llm1Error::NotFound(format!("{request} is not a request handle")))?;
        self.scheduler.cancel(&client, id).map_err(|e| match e {
            CancelError::NotFound => Llm1Error::NotFound(format!("{request}: {e}")),
            CancelError::NotOwner => Llm1Error::AccessDenied(format!("{request}: {e}")),
        })
    }

    /// The token ids Generate would feed the model for this prompt.
    #[zbus(out_args("tokens"))]
    async fn tokenize(&self, text: String) -> Result<Vec<u32>, Llm1Error> {
        let models = Arc::clone(&self.models);
        blocking(move || request::encode_prompt(&*model_text(&models, None)?, &text)).await
    }

    /// The text of token ids; special tokens are left out.
    #[zbus(out_args("text"))]
    async fn detokenize(&self, tokens: Vec<u32>) -> Result<String, Llm1Error> {
        let models = Arc::clone(&self.models);
        blocking(move || {
            model_text(&models, None)?
                .tokenizer()
                .decode(&tokens, true)
                .map(|text| wire_text(&text).into_owned())
                .map_err(|e| match e {
                    TokenizerError::UnknownId { .. } => Llm1Error::InvalidArgument(e.to_string()),
                    _ => Llm1Error::Internal(e.to_string()),
                })
        })
        .await
    }

    /// A request's text piece.
    #[zbus(signal)]
    async fn token(
        emitter: &SignalEmitter<'_>,
        request: ObjectPath<'_>,
        text: &str,
    ) -> zbus::Result<()>;

    /// A request's end, sent exactly once per request. reason: stop, length, cancelled,
    /// disconnected, shutdown or error. stats: model (s), prompt_tokens (u), reused_tokens (u),
    /// generated_tokens (u), prefill_tokens_per_s (d), decode_tokens_per_s (d),
    /// constraint_ms_per_token (d) when the request had a json_schema, regex or grammar, and
    /// error (s) when reason is error.
    #[zbus(signal)]
    async fn finished(
        emitter: &SignalEmitter<'_>,
        request: ObjectPath<'_>,
        reason: &str,
        stats: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<()>;

    /// What this daemon accepts and offers: "options" (a{sv}: each option's name to its
    /// "type" (s, a D-Bus signature), "description" (s), "example" (v), "default" (v, absent
    /// when leaving the option out means no value: a drawn seed, no constraint, the default
    /// model) and, when bounded, "minimum" (v), "maximum" (v), "minimum_excluded" (b) and
    /// "range" (s)), "limits" (a{sv}: context_length, max_tokens, queue_capacity,
    /// max_queued_per_client, parallel, kv_memory_mib, max_stop_strings, all u; the context is the default model's, 0
    /// without one) and "features" (as).
    #[zbus(property(emits_changed_signal = "false"))]
    fn capabilities(&self) -> HashMap<String, OwnedVariant> {
        let model = self.default_model().ok();
        let limits = Limits {
            context_length: model
                .as_ref()
                .map_or(0, |m| u32::try_from(m.context_length).unwrap_or(u32::MAX)),
            ..self.limits
        };
        let chat = model
            .and_then(|m| self.models.text(&m).ok())
            .is_some_and(|text| text.chat_template().is_some());
        capabilities::capabilities(&limits, chat)
    }

    /// The default model's name (the one a request without the model option gets); empty
    /// when no model is installed.
    #[zbus(property(emits_changed_signal = "false"))]
    fn model(&self) -> String {
        self.default_model().map(|m| m.name).unwrap_or_default()
    }

    /// The most tokens (prompt and generated) one request to the default model can hold; 0
    /// without a model.
    #[zbus(property(emits_changed_signal = "false"))]
    fn context_length(&self) -> u32 {
        self.default_model()
            .map_or(0, |m| u32::try_from(m.context_length).unwrap_or(u32::MAX))
    }

    /// How the default model's weights are stored: fp8_e4m3fn (fp8_e4m3fn/blockN with
    /// per-block scales), f16 or f32; empty without a model.
    #[zbus(property(emits_changed_signal = "false"))]
    fn quantization(&self) -> String {
        self.default_model()
            .map(|m| m.quantization)
            .unwrap_or_default()
    }

    /// The installed models, the default first: (name, quantization, context length, size
    /// of the bundle's files in bytes).
    #[zbus(property(emits_changed_signal = "false"))]
    fn models(&self) -> Vec<(String, String, u32, u64)> {
        self.models
            .list()
            .into_iter()
            .map(|m| {
                let context = u32::try_from(m.context_length).unwrap_or(u32::MAX);
                (m.name, m.quantization, context, m.size_bytes)
            })
            .collect()
    }

    /// The model whose weights are resident; empty when none is.
    #[zbus(property(emits_changed_signal = "false"))]
    fn loaded_model(&self) -> String {
        self.scheduler.status().loaded_model.unwrap_or_default()
    }

    /// no-model (nothing installed: generation fails with NoModel), unloaded (no model
    /// resident), loading, idle (a model resident, nothing running) or generating.
    #[zbus(property(emits_changed_signal = "false"))]
    fn state(&self) -> String {
        let status = self.scheduler.status();
        let state = if status.running > 0 {
            state::GENERATING
        } else if status.loading {
            state::LOADING
        } else if status.loaded_model.is_some() {
            state::IDLE
        } else if self.default_model().is_err() {
            state::NO_MODEL
        } else {
            state::UNLOADED
        };
        state.to_owned()
    }

    /// Requests waiting or running, over all clients.
    #[zbus(property(emits_changed_signal = "false"))]
    fn queue_length(&self) -> u32 {
        u32::try_from(self.scheduler.queue_length()).unwrap_or(u32::MAX)
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }
}

impl Llm1 {
    fn default_model(&self) -> Result<ModelInfo, ModelsError> {
        self.models.default_model()
    }
}

/// The text side of the model `name` (the default when `None`), read at its first use.
fn model_text(models: &Models, name: Option<&str>) -> Result<Arc<TextSide>, Llm1Error> {
    let model = models.find(name).map_err(models_error)?;
    models.text(&model).map_err(models_error)
}

fn models_error(e: ModelsError) -> Llm1Error {
    match e {
        ModelsError::NoModel(_) | ModelsError::DefaultMissing(_) => {
            Llm1Error::NoModel(e.to_string())
        }
        ModelsError::Unknown { .. } => Llm1Error::InvalidOption(format!("option `model`: {e}")),
        ModelsError::Bundle { .. } | ModelsError::Text { .. } => Llm1Error::Internal(e.to_string()),
    }
}

/// Sends a request's events as signals, in order, after its handle has been replied.
async fn forward(
    emitter: SignalEmitter<'static>,
    path: OwnedObjectPath,
    model: String,
    reply_sent: ResponseDispatchListener,
    mut events: mpsc::Receiver<Event>,
    _guard: StreamGuard,
) {
    reply_sent.await;
    while let Some(event) = events.recv().await {
        let sent = match &event {
            Event::Text(text) => Llm1::token(&emitter, path.as_ref(), &wire_text(text)).await,
            Event::Finished(finished) => {
                Llm1::finished(
                    &emitter,
                    path.as_ref(),
                    finished.reason.as_str(),
                    stats(finished, &model),
                )
                .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(request = %path, "cannot send a signal: {e}");
        }
        if matches!(event, Event::Finished(_)) {
            return;
        }
    }
}

/// Text as D-Bus can carry it. A model can generate U+0000 (e.g. the byte token `<0x00>`),
/// but a D-Bus string must not contain it, and the bus disconnects a sender whose message
/// has one — every client's stream would end. It becomes U+FFFD, as undecodable bytes do.
fn wire_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The figures of a finished request, as `Finished` and `Complete` report them.
fn stats(finished: &RequestEnd, model: &str) -> HashMap<&'static str, Variant<'static>> {
    let mut stats = HashMap::from([
        ("reason", Variant::from(finished.reason.as_str())),
        ("model", Variant::from(model.to_owned())),
    ]);
    if let Some(outcome) = &finished.outcome {
        let count = |n: usize| Variant::U32(u32::try_from(n).unwrap_or(u32::MAX));
        stats.insert("prompt_tokens", count(outcome.prompt_tokens));
        stats.insert("reused_tokens", count(outcome.reused_tokens));
        stats.insert("generated_tokens", count(outcome.generated_tokens));
        stats.insert(
            "prefill_tokens_per_s",
            Variant::F64(outcome.prefill_tokens_per_s),
        );
        stats.insert(
            "decode_tokens_per_s",
            Variant::F64(outcome.decode_tokens_per_s),
        );
        if let Some(seconds) = outcome.constraint_s_per_token {
            stats.insert("constraint_ms_per_token", Variant::F64(seconds * 1e3));
        }
    }
    if let Some(error) = &finished.error {
        stats.insert("error", Variant::from(error.clone()));
    }
    stats
}

fn owned(
    stats: HashMap<&'static str, Variant<'static>>,
) -> Result<HashMap<String, OwnedVariant>, Llm1Error> {
    stats
        .into_iter()
        .map(|(k, v)| Ok((k.to_owned(), OwnedVariant::try_from(v).map_err(internal)?)))
        .collect()
}

fn request_path(id: RequestId) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{REQUEST_PATH_PREFIX}{id}"))
        .expect("a prefix of valid path elements and a decimal number form a valid path")
}

/// The caller's unique name; every message on a bus carries one.
fn caller(header: &Header<'_>) -> Result<String, Llm1Error> {
    header
        .sender()
        .map(|sender| sender.to_string())
        .ok_or_else(|| Llm1Error::Internal("the call has no sender; is this a bus?".into()))
}

fn internal(e: impl std::fmt::Display) -> Llm1Error {
    Llm1Error::Internal(e.to_string())
}

/// Runs text work (tokenizing megabytes can take a while) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Llm1Error> + Send + 'static,
) -> Result<T, Llm1Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Llm1Error::Internal(format!("engine task failed: {e}")))?
}
