//! Who generates next: a bounded queue, fair between clients, in front of the one worker
//! thread that owns the model's conversation.
//!
//! Generation is CPU-bound and a conversation's KV cache is large, so requests run one at a time on
//! a dedicated thread (never on the async runtime, whose threads must keep serving the bus).
//! Waiting requests are kept per client and taken in turn, one request per client per turn, so
//! a client with many requests delays another's single one by at most one generation. The
//! queue is bounded overall and per client: past either bound a request is refused at once
//! (`Busy`) instead of waiting unboundedly.
//!
//! A request is stopped through a flag the engine polls before every token, so a cancel, a
//! client leaving the bus or a shutdown ends a running generation within one token. The
//! scheduler reaches the model only through [`crate::engine`]; it may drop the engine after a
//! period without work (unmapping the weights) and load it again on the next request.
//!
//! One model is resident at a time. Requests arrive prepared, each with the text side of the
//! model it was prepared for, which names the model: a request for another model than the
//! resident one drops the resident engine (and its conversation) before loading the other, so
//! that two models' weights and KV caches are never held together.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::batch::{Batch, Listener};
use crate::engine::{EndReason, Engine, EngineError, GenerationOutcome};
use crate::request::GenerateRequest;
use crate::text::TextSide;

/// A request's number, unique for the daemon's lifetime.
pub type RequestId = u64;

/// The end of a request: why, and the engine's figures when it ran.
#[derive(Debug, Clone)]
pub struct RequestEnd {
    pub reason: EndReason,
    pub outcome: Option<GenerationOutcome>,
    /// The engine's message when `reason` is [`EndReason::Error`].
    pub error: Option<String>,
}

/// What a request's client hears, in order: text pieces, then exactly one `Finished`.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    Finished(RequestEnd),
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("this client already has {0} requests waiting; wait for one to finish")]
    ClientQueueFull(usize),
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no such request: it has finished or never existed")]
    NotFound,
    #[error("the request belongs to another client")]
    NotOwner,
}

/// Bounds and timers of the queue.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub queue_capacity: usize,
    pub max_queued_per_client: usize,
    /// Requests generated together (KV cache slots): at least 1.
    pub parallel: usize,
    /// Bytes the `parallel` KV caches may come to hold at the model's full context.
    pub kv_budget: u64,
    /// Drop the engine (unmapping the weights) after this long without a request.
    pub idle_unload: Option<Duration>,
}

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the generation thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Loads the weights side of the model whose text side it is given: after an idle unload, or
/// for a request for another model than the resident one.
pub type EngineLoader =
    Box<dyn Fn(&Arc<TextSide>) -> Result<Arc<Engine>, EngineError> + Send + Sync>;

/// A snapshot for status lines and the `State` property.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStatus {
    pub waiting: usize,
    /// Requests being generated.
    pub running: usize,
    /// The resident model's name.
    pub loaded_model: Option<String>,
    /// A model's weights are being loaded.
    pub loading: bool,
    /// Decode speed of the last finished request, tokens/s.
    pub last_decode_tokens_per_s: Option<f64>,
}

struct Job {
    id: RequestId,
    client: String,
    /// The text side of the model the request was prepared for.
    model: Arc<TextSide>,
    request: GenerateRequest,
    stop: Arc<AtomicU8>,
    events: mpsc::Sender<Event>,
}

struct Running {
    id: RequestId,
    client: String,
    stop: Arc<AtomicU8>,
}

struct State {
    /// Waiting requests per client, oldest first.
    queues: HashMap<String, VecDeque<Job>>,
    /// Clients with waiting requests, in the order they get their next turn.
    turns: VecDeque<String>,
    waiting: usize,
    /// Requests being generated, decoded together.
    running: Vec<Running>,
    shutting_down: bool,
    next_id: RequestId,
    last_activity: Instant,
    last_decode_tokens_per_s: Option<f64>,
    /// The name of the model in the engine slot, kept here so that a status never waits for
    /// the slot, which a load holds for seconds.
    loaded_model: Option<String>,
    loading: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on new work, on shutdown and when the engine is loaded outside the worker.
    wake: Condvar,
    engine: Mutex<Option<Arc<Engine>>>,
    loader: EngineLoader,
    options: SchedulerOptions,
}

/// The queue and its worker thread. Dropping it does not stop the worker: call
/// [`Scheduler::shutdown`].
pub struct Scheduler {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the worker thread with `engine`, the default model loaded by the caller so that
    /// a bad bundle fails the start, not the first request (`None` when no model is
    /// installed); `loader` loads a model's weights when a request needs them.
    pub fn start(
        engine: Option<Arc<Engine>>,
        loader: EngineLoader,
        options: SchedulerOptions,
    ) -> Result<Self, StartError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: HashMap::new(),
                turns: VecDeque::new(),
                waiting: 0,
                running: Vec::new(),
                shutting_down: false,
                next_id: 1,
                last_activity: Instant::now(),
                last_decode_tokens_per_s: None,
                loaded_model: engine
                    .as_ref()
                    .map(|engine| engine.text().model_name().to_owned()),
                loading: false,
            }),
            wake: Condvar::new(),
            engine: Mutex::new(engine),
            loader,
            options,
        });
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("marengo-generate".into())
            .spawn(move || worker_loop(&worker_shared))
            .map_err(StartError::Thread)?;
        Ok(Self {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Queues `request`, prepared on `model`'s text side, for `client` (its unique bus name).
    /// `events` receives its text and its end.
    pub fn submit(
        &self,
        client: &str,
        model: Arc<TextSide>,
        request: GenerateRequest,
        events: mpsc::Sender<Event>,
    ) -> Result<RequestId, SubmitError> {
        let options = &self.shared.options;
        let mut state = self.shared.lock_state();
        if state.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        if state.waiting >= options.queue_capacity {
            return Err(SubmitError::QueueFull(state.waiting));
        }
        let client_waiting = state.queues.get(client).map_or(0, VecDeque::len);
        if client_waiting >= options.max_queued_per_client {
            return Err(SubmitError::ClientQueueFull(client_waiting));
        }
        let id = state.next_id;
        state.next_id += 1;
        let job = Job {
            id,
            client: client.to_owned(),
            model,
            request,
            stop: Arc::new(AtomicU8::new(0)),
            events,
        };
        let queue = state.queues.entry(client.to_owned()).or_default();
        queue.push_back(job);
        if queue.len() == 1 {
            state.turns.push_back(client.to_owned());
        }
        state.waiting += 1;
        state.last_activity = Instant::now();
        drop(state);
        self.shared.wake.notify_all();
        Ok(id)
    }

    /// Cancels request `id` on behalf of `client`; only its owner may.
    pub fn cancel(&self, client: &str, id: RequestId) -> Result<(), CancelError> {
        let mut state = self.shared.lock_state();
        if let Some(running) = state.running.iter().find(|running| running.id == id) {
            if running.client != client {
                return Err(CancelError::NotOwner);
            }
            request_stop(&running.stop, EndReason::Cancelled);
            return Ok(());
        }
        let owner = state
            .queues
            .iter()
            .find(|(_, queue)| queue.iter().any(|job| job.id == id))
            .map(|(owner, _)| owner.clone())
            .ok_or(CancelError::NotFound)?;
        if owner != client {
            return Err(CancelError::NotOwner);
        }
        let removed = state.remove_waiting(client, |job| job.id == id);
        drop(state);
        finish_unstarted(removed, EndReason::Cancelled);
        Ok(())
    }

    /// Ends every request of a client that left the bus: waiting ones at once, the running
    /// one before its next token.
    pub fn client_gone(&self, client: &str) {
        let mut state = self.shared.lock_state();
        for running in state
            .running
            .iter()
            .filter(|running| running.client == client)
        {
            request_stop(&running.stop, EndReason::Disconnected);
        }
        let removed = state.remove_waiting(client, |_| true);
        drop(state);
        finish_unstarted(removed, EndReason::Disconnected);
    }

    /// Refuses new requests, ends waiting ones and stops the running one with reason
    /// `shutdown`, then waits for the worker thread. Blocking.
    pub fn shutdown(&self) {
        let mut state = self.shared.lock_state();
        state.shutting_down = true;
        for running in &state.running {
            request_stop(&running.stop, EndReason::Shutdown);
        }
        let clients: Vec<String> = state.queues.keys().cloned().collect();
        let removed: Vec<Job> = clients
            .iter()
            .flat_map(|client| state.remove_waiting(client, |_| true))
            .collect();
        drop(state);
        self.shared.wake.notify_all();
        finish_unstarted(removed, EndReason::Shutdown);
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(worker) = worker
            && worker.join().is_err()
        {
            tracing::error!("the generation thread panicked");
        }
    }

    /// The bounds and timers it was started with.
    pub fn options(&self) -> &SchedulerOptions {
        &self.shared.options
    }

    /// Requests waiting or running.
    pub fn queue_length(&self) -> usize {
        let state = self.shared.lock_state();
        state.waiting + state.running.len()
    }

    pub fn status(&self) -> SchedulerStatus {
        let state = self.shared.lock_state();
        SchedulerStatus {
            waiting: state.waiting,
            running: state.running.len(),
            loaded_model: state.loaded_model.clone(),
            loading: state.loading,
            last_decode_tokens_per_s: state.last_decode_tokens_per_s,
        }
    }
}

impl State {
    /// Takes the waiting jobs of `client` that `matches`, keeping the turn order consistent.
    fn remove_waiting(&mut self, client: &str, matches: impl Fn(&Job) -> bool) -> Vec<Job> {
        let Some(queue) = self.queues.get_mut(client) else {
            return Vec::new();
        };
        let (removed, kept): (VecDeque<Job>, VecDeque<Job>) =
            queue.drain(..).partition(|job| matches(job));
        *queue = kept;
        if queue.is_empty() {
            self.queues.remove(client);
            self.turns.retain(|c| c != client);
        }
        self.waiting -= removed.len();
        removed.into()
    }

    /// The job [`State::next_fair`] would take.
    fn peek_fair(&self) -> Option<&Job> {
        self.queues.get(self.turns.front()?)?.front()
    }

    /// The next job in turn: the first waiting request of the client whose turn it is.
    fn next_fair(&mut self) -> Option<Job> {
        let client = self.turns.pop_front()?;
        let queue = self.queues.get_mut(&client)?;
        let job = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.waiting -= 1;
        Some(job)
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The engine of `model`, loaded if it is not the resident one; the resident one is
    /// dropped first, so that the two are never mapped together.
    fn engine(&self, model: &Arc<TextSide>) -> Result<Arc<Engine>, EngineError> {
        let mut slot = self
            .engine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(engine) = slot.as_ref() {
            if Arc::ptr_eq(engine.text(), model) {
                return Ok(Arc::clone(engine));
            }
            tracing::info!(model = %engine.text().model_name(), "unloading the model for another");
            *slot = None;
        }
        {
            let mut state = self.lock_state();
            state.loaded_model = None;
            state.loading = true;
        }
        tracing::info!(model = %model.model_name(), "loading the model");
        let loaded = (self.loader)(model);
        let mut state = self.lock_state();
        state.loading = false;
        let engine = loaded?;
        state.loaded_model = Some(model.model_name().to_owned());
        state.last_activity = Instant::now();
        *slot = Some(Arc::clone(&engine));
        drop(slot);
        drop(state);
        // The worker may be waiting without a timeout because nothing was loaded.
        self.wake.notify_all();
        Ok(engine)
    }

    fn unload_engine(&self) {
        let unloaded = self
            .engine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if unloaded.is_some() {
            tracing::info!("idle: model unloaded");
        }
    }

    /// Blocks until there is work: returns the jobs to start (marking them running), at most
    /// `room` of them, all for one model (the running ones', when `running_model` names it),
    /// or an empty list while requests are running. `None` once shutting down with nothing
    /// running. Drops `batch` and the engine when idle for longer than `idle_unload`.
    fn next_jobs(&self, batch: &mut Option<Batch<JobListener>>, room: usize) -> Option<Vec<Job>> {
        let running_model = batch
            .as_ref()
            .filter(|batch| !batch.is_empty())
            .map(|batch| Arc::clone(batch.engine().text()));
        let mut state = self.lock_state();
        loop {
            if state.shutting_down && running_model.is_none() {
                return None;
            }
            let mut jobs: Vec<Job> = Vec::new();
            while jobs.len() < room && !state.shutting_down {
                let model = running_model
                    .as_ref()
                    .or(jobs.first().map(|job| &job.model));
                // A request for another model waits, at the head of the line, until the
                // running ones are done; nothing is started past it.
                if let Some(model) = model
                    && state
                        .peek_fair()
                        .is_some_and(|next| !Arc::ptr_eq(&next.model, model))
                {
                    break;
                }
                let Some(job) = state.next_fair() else { break };
                state.running.push(Running {
                    id: job.id,
                    client: job.client.clone(),
                    stop: Arc::clone(&job.stop),
                });
                jobs.push(job);
            }
            if !jobs.is_empty() || running_model.is_some() {
                return Some(jobs);
            }
            // `try_lock`: a busy slot is being loaded, and the loader wakes us when done.
            let loaded = matches!(self.engine.try_lock(), Ok(slot) if slot.is_some());
            match self.options.idle_unload {
                Some(idle) if loaded => {
                    let idle_for = state.last_activity.elapsed();
                    if idle_for >= idle {
                        *batch = None;
                        self.unload_engine();
                        state.loaded_model = None;
                        continue;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, idle - idle_for)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
                _ => {
                    state = self
                        .wake
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
        }
    }
}

/// A job as the batch sees it: its stop flag and where its text goes.
struct JobListener {
    id: RequestId,
    client: String,
    stop: Arc<AtomicU8>,
    events: mpsc::Sender<Event>,
}

impl Listener for JobListener {
    fn stop(&self) -> Option<EndReason> {
        stop_reason(self.stop.load(Ordering::Acquire))
    }

    fn text(&mut self, text: &str) {
        // A closed receiver means nobody listens any more; the stop flag ends the work.
        let _ = self.events.blocking_send(Event::Text(text.to_owned()));
    }
}

fn worker_loop(shared: &Shared) {
    let mut batch: Option<Batch<JobListener>> = None;
    loop {
        let room = batch.as_ref().map_or(shared.options.parallel, |batch| {
            shared.options.parallel - batch.len()
        });
        let Some(jobs) = shared.next_jobs(&mut batch, room) else {
            break;
        };
        for job in jobs {
            start_job(shared, &mut batch, job);
        }
        let Some(running) = batch.as_mut().filter(|batch| !batch.is_empty()) else {
            continue;
        };
        for ended in running.step() {
            let end = match ended.result {
                Ok(outcome) => RequestEnd {
                    reason: outcome.reason,
                    outcome: Some(outcome),
                    error: None,
                },
                Err(error) => failed(ended.listener.id, error),
            };
            finish_job(shared, ended.listener, end);
        }
    }
}

/// Starts `job` in the batch of its model, loading that model (and dropping the resident
/// one, whose batch is empty) if it is not the resident one.
fn start_job(shared: &Shared, batch: &mut Option<Batch<JobListener>>, job: Job) {
    let listener = JobListener {
        id: job.id,
        client: job.client,
        stop: job.stop,
        events: job.events,
    };
    // A batch holds its engine: it goes first when the request is for another model.
    if batch
        .as_ref()
        .is_some_and(|batch| !Arc::ptr_eq(batch.engine().text(), &job.model))
    {
        *batch = None;
    }
    let running = match batch {
        Some(batch) => batch,
        None => match shared.engine(&job.model).and_then(|engine| {
            Batch::new(engine, shared.options.parallel, shared.options.kv_budget)
        }) {
            Ok(new) => batch.insert(new),
            Err(error) => {
                let end = failed(listener.id, error);
                return finish_job(shared, listener, end);
            }
        },
    };
    if let Err(ended) = running.start(job.request, listener) {
        let error = ended
            .result
            .expect_err("a request that did not start failed");
        let end = failed(ended.listener.id, error);
        finish_job(shared, ended.listener, end);
    }
}

fn failed(id: RequestId, error: EngineError) -> RequestEnd {
    tracing::error!(request = id, "generation failed: {error}");
    RequestEnd {
        reason: EndReason::Error,
        outcome: None,
        error: Some(error.to_string()),
    }
}

fn finish_job(shared: &Shared, listener: JobListener, finished: RequestEnd) {
    tracing::info!(
        request = listener.id,
        client = %listener.client,
        reason = %finished.reason.as_str(),
        generated_tokens = finished.outcome.as_ref().map_or(0, |o| o.generated_tokens),
        "request finished"
    );
    let mut state = shared.lock_state();
    state.running.retain(|running| running.id != listener.id);
    state.last_activity = Instant::now();
    if let Some(outcome) = &finished.outcome {
        state.last_decode_tokens_per_s = Some(outcome.decode_tokens_per_s);
    }
    drop(state);
    // The receiver is gone only if its forwarding task is; nobody is left to tell.
    let _ = listener.events.blocking_send(Event::Finished(finished));
    // A request leaves its buffers (strings, the bus's messages, the sampler's) free in
    // several threads' malloc arenas, which glibc keeps: without this the daemon's anonymous
    // memory grew by about 2 KB a request (10 % over 900 requests of a soak). The walk takes
    // about 0.2 ms (up to a few ms), between two steps of the batch.
    crate::memory::release_free_heap();
}

/// The reason a stop flag holds: none while it is 0, else the first reason requested.
fn stop_reason(flag: u8) -> Option<EndReason> {
    [
        EndReason::Cancelled,
        EndReason::Disconnected,
        EndReason::Shutdown,
    ]
    .into_iter()
    .find(|r| *r as u8 == flag)
}

fn request_stop(flag: &AtomicU8, reason: EndReason) {
    // The first reason wins: a shutdown after a cancel is still reported as the cancel.
    let _ = flag.compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
}

/// Tells the clients of jobs that never ran that they ended. Their channels are empty (nothing
/// was generated), so `try_send` cannot find them full.
fn finish_unstarted(jobs: Vec<Job>, reason: EndReason) {
    for job in jobs {
        tracing::info!(
            request = job.id,
            client = %job.client,
            reason = %reason.as_str(),
            generated_tokens = 0,
            "request finished"
        );
        let _ = job.events.try_send(Event::Finished(RequestEnd {
            reason,
            outcome: None,
            error: None,
        }));
    }
}
