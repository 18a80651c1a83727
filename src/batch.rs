//! The requests running on one model, decoded together: one forward pass per step for all of
//! them, each at its own position, with its own sampler, stop strings and options.
//!
//! Decode is bound by reading the weights, and one pass over them serves several sequences
//! for little more than the price of one, so a step advances every running request at once
//! ([`Lanes::step`]). A request that joins feeds its prompt one chunk per step, between the
//! others' tokens, so no running stream waits for more than one chunk.
//!
//! Each request runs in a lane (a KV cache slot), and a lane keeps its tokens when its
//! request ends: the next turn of that conversation, whose prompt extends what the lane
//! holds, is given that lane back and feeds only what is new. Otherwise a request takes the
//! least recently used free lane: the conversations given up first are those idle longest.

use std::sync::Arc;

use crate::engine::{EndReason, Engine, EngineError, Generation, GenerationOutcome, Step};
use crate::request::GenerateRequest;
use crate::sequence::{Lanes, PREFILL_CHUNK};

/// Whether `lanes` full KV caches of `engine`'s model fit in `kv_budget` bytes: checked at
/// start and at every load, so that a configuration that cannot fit is an error then rather
/// than an out-of-memory kill when the conversations have grown.
pub fn check_kv_budget(engine: &Engine, lanes: usize, kv_budget: u64) -> Result<(), EngineError> {
    let lane = engine.kv_bytes_per_lane();
    let need = lane.saturating_mul(lanes as u64);
    if need <= kv_budget {
        return Ok(());
    }
    const MIB: u64 = 1 << 20;
    Err(EngineError::KvBudget {
        model: engine.text().model_name().to_owned(),
        lanes,
        lane_mib: lane.div_ceil(MIB),
        need_mib: need.div_ceil(MIB),
        budget_mib: kv_budget / MIB,
        context: engine.text().context_length(),
    })
}

/// Who a running request answers to: the scheduler's job, or a test's.
pub trait Listener {
    /// A reason to end now (cancel, departure, shutdown), polled before every token.
    fn stop(&self) -> Option<EndReason>;
    /// A piece of generated text.
    fn text(&mut self, text: &str);
}

/// A request that has ended, with what its listener needs to close it.
pub struct Ended<L> {
    pub listener: L,
    pub result: Result<GenerationOutcome, EngineError>,
}

struct Running<L> {
    listener: L,
    request: GenerateRequest,
    generation: Generation,
    lane: usize,
    /// Prompt tokens in the lane's cache; the prompt is fed while this is short of its length.
    fed: usize,
    /// Prompt tokens the lane held already.
    reused: usize,
    /// The logits after the last token fed, once the prompt is in.
    logits: Option<Vec<f32>>,
}

/// The lanes of one engine and the requests running in them.
pub struct Batch<L> {
    engine: Arc<Engine>,
    lanes: Lanes,
    /// Per lane, when it last served a request (a step count), for giving up the least
    /// recently used first.
    last_used: Vec<u64>,
    clock: u64,
    running: Vec<Running<L>>,
}

impl<L: Listener> Batch<L> {
    /// `lanes` KV cache slots on `engine`, none in use, refused if they could come to hold
    /// more than `kv_budget` bytes.
    pub fn new(engine: Arc<Engine>, lanes: usize, kv_budget: u64) -> Result<Self, EngineError> {
        check_kv_budget(&engine, lanes, kv_budget)?;
        let lanes = engine.new_lanes(lanes)?;
        Ok(Batch {
            last_used: vec![0; lanes.count()],
            engine,
            lanes,
            clock: 0,
            running: Vec::new(),
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Requests running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether another request can start.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.lanes.count()
    }

    /// Starts `request`; it runs from the next [`Batch::step`] on. The batch must have room.
    pub fn start(&mut self, request: GenerateRequest, listener: L) -> Result<(), Ended<L>> {
        let generation = match Generation::new(self.engine.text(), &request) {
            Ok(generation) => generation,
            Err(error) => {
                return Err(Ended {
                    listener,
                    result: Err(error),
                });
            }
        };
        let lane = self.free_lane(request.prompt());
        self.running.push(Running {
            listener,
            request,
            generation,
            lane,
            fed: 0,
            reused: 0,
            logits: None,
        });
        Ok(())
    }

    /// The free lane that shares the longest start with the prompt (the conversation's own
    /// lane: its next turn repeats the history, and the lane holds it) when the prompt keeps
    /// at least half of what that lane holds; else the free lane least recently used, so
    /// that a new conversation does not cut short another one's that shares only a system
    /// prompt with it.
    fn free_lane(&self, prompt: &[u32]) -> usize {
        let free: Vec<usize> = (0..self.lanes.count())
            .filter(|lane| self.running.iter().all(|r| r.lane != *lane))
            .collect();
        let common = |lane: usize| {
            let cached = self.lanes.cached(lane);
            cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = free
            .iter()
            .copied()
            .max_by_key(|&lane| (common(lane), self.last_used[lane]))
            .expect("a free lane, since the batch has room");
        let shared = common(best);
        if shared > 0 && 2 * shared >= self.lanes.cached(best).len() {
            return best;
        }
        free.into_iter()
            .min_by_key(|&lane| self.last_used[lane])
            .expect("a free lane, since the batch has room")
    }

    /// One step: a chunk of the first prompt still being fed, then one token for every
    /// request whose prompt is in, all in one forward pass. Returns the requests that ended.
    pub fn step(&mut self) -> Vec<Ended<L>> {
        self.clock += 1;
        let mut ended = Vec::new();
        if let Some(index) = self.running.iter().position(|r| r.logits.is_none())
            && let Err(error) = self.feed_prompt(index)
        {
            ended.push(self.end(index, Err(error)));
        }
        let mut steps = Vec::new();
        let mut index = 0;
        while index < self.running.len() {
            let running = &mut self.running[index];
            let Some(mut logits) = running.logits.take() else {
                index += 1;
                continue;
            };
            let cached = self.lanes.cached(running.lane).len();
            let stop = running.listener.stop();
            let listener = &mut running.listener;
            match running
                .generation
                .advance(&mut logits, cached, stop, &mut |text| listener.text(text))
            {
                Ok(Step::Feed(id)) => {
                    steps.push((running.lane, id));
                    index += 1;
                }
                Ok(Step::End) => {
                    let result = self.finish(index);
                    ended.push(result);
                }
                Err(error) => ended.push(self.end(index, Err(error))),
            }
        }
        if !steps.is_empty() {
            match self.lanes.step(&steps) {
                Ok(logits) => {
                    let vocab = logits.len() / steps.len();
                    for ((lane, _), row) in steps.iter().zip(logits.chunks_exact(vocab)) {
                        if let Some(running) = self.running.iter_mut().find(|r| r.lane == *lane) {
                            running.logits = Some(row.to_vec());
                        }
                    }
                }
                Err(error) => {
                    // A failed pass fails every request it carried.
                    let message = error.to_string();
                    tracing::error!("decode step failed: {message}");
                    for (lane, _) in &steps {
                        if let Some(index) = self.running.iter().position(|r| r.lane == *lane) {
                            let error = crate::sequence::SequenceError::Run(
                                tract_onnx::prelude::TractError::msg(message.clone()),
                            );
                            ended.push(self.end(index, Err(error.into())));
                        }
                    }
                }
            }
        }
        ended
    }

    /// Feeds the next chunk of request `index`'s prompt (after reusing what its lane holds),
    /// or ends it at once if its listener asks to stop.
    fn feed_prompt(&mut self, index: usize) -> Result<(), EngineError> {
        let running = &mut self.running[index];
        if running.listener.stop().is_some() {
            // `advance` ends it with that reason at this step's decode.
            running.logits = Some(Vec::new());
            return Ok(());
        }
        let prompt = running.request.prompt();
        if running.fed == 0 {
            running.reused = self.lanes.reuse_prefix(running.lane, prompt)?;
            running.fed = running.reused;
        }
        let end = (running.fed + PREFILL_CHUNK).min(prompt.len());
        let logits = self.lanes.feed(running.lane, &prompt[running.fed..end])?;
        running.fed = end;
        self.last_used[running.lane] = self.clock;
        if end == prompt.len() {
            running.generation.prefilled(running.reused);
            running.logits = Some(logits);
        }
        Ok(())
    }

    fn finish(&mut self, index: usize) -> Ended<L> {
        let mut running = self.running.swap_remove(index);
        self.last_used[running.lane] = self.clock;
        let listener = &mut running.listener;
        let result = running.generation.finish(&mut |text| listener.text(text));
        Ended {
            listener: running.listener,
            result,
        }
    }

    fn end(&mut self, index: usize, result: Result<GenerationOutcome, EngineError>) -> Ended<L> {
        let running = self.running.swap_remove(index);
        // What the lane holds may be half a prompt; it stays valid for its tokens.
        self.last_used[running.lane] = self.clock;
        Ended {
            listener: running.listener,
            result,
        }
    }

    /// Tokens each lane holds, for the status.
    pub fn cached_tokens(&self) -> usize {
        (0..self.lanes.count())
            .map(|lane| self.lanes.cached(lane).len())
            .sum()
    }
}
