//! Choosing the next token from the model's logits.
//!
//! The order of the steps is llama.cpp's, so that the same options mean the same thing to a
//! user coming from it:
//!
//! 1. repetition penalty on the ids of the last `repeat_last_n` tokens (prompt included);
//! 2. top-k: keep the `top_k` highest logits;
//! 3. top-p: keep the smallest set of highest-probability tokens whose mass reaches `top_p`;
//! 4. min-p: drop tokens less likely than `min_p` × the most likely one;
//! 5. temperature: divide the logits by `temperature`;
//! 6. draw from the softmax of what is left.
//!
//! Top-p and min-p therefore look at the distribution before temperature. `temperature == 0`
//! is greedy decoding: the highest logit after the penalty, the lowest id on a tie (as numpy's
//! and torch's `argmax`), without touching the random generator.
//!
//! The random generator is ChaCha20 seeded from one `u64`: the same seed, options and logits
//! give the same tokens on every platform. Each step works in one buffer kept between calls and
//! needs no full sort of the vocabulary: top-k is a selection, top-p a selection on probability
//! mass.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Longest repetition window accepted: the window is kept in memory for each request.
pub const MAX_REPEAT_LAST_N: u32 = 65_536;

/// Errors of sampling options and of sampling itself.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// `key` is the option's name as clients spell it (`top_p`), for the D-Bus `InvalidOption`.
    #[error("option {key} = {value} is out of range: allowed {allowed}")]
    OutOfRange {
        key: &'static str,
        value: f64,
        allowed: &'static str,
    },
    #[error("no finite logit among the {vocab_size} given: nothing to sample")]
    NoFiniteLogit { vocab_size: usize },
}

/// How to choose tokens. [`Default`] is llama.cpp's default, with no repetition penalty: the
/// request defaults of every entry point ([`marengo_client::defaults`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; higher flattens the distribution. Allowed 0 to 10.
    pub temperature: f32,
    /// Keep only this many most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Nucleus mass, in (0, 1]; 1 keeps all.
    pub top_p: f32,
    /// Relative probability floor, in [0, 1]; 0 keeps all.
    pub min_p: f32,
    /// Divides positive logits and multiplies negative ones of recent tokens; 1 is off.
    /// Allowed above 0, up to 10.
    pub repeat_penalty: f32,
    /// How many of the last tokens the penalty looks at; 0 is off.
    pub repeat_last_n: u32,
    /// Seed of the random generator; `None` draws one, which [`Sampler::seed`] reports so that
    /// a run can be repeated.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        use marengo_client::defaults;
        Self {
            temperature: defaults::TEMPERATURE as f32,
            top_k: defaults::TOP_K,
            top_p: defaults::TOP_P as f32,
            min_p: defaults::MIN_P as f32,
            repeat_penalty: defaults::REPEAT_PENALTY as f32,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every option against its allowed range; the error names the first one out of it.
    pub fn validate(&self) -> Result<(), SamplingError> {
        check("temperature", self.temperature, &ranges::TEMPERATURE)?;
        check("top_p", self.top_p, &ranges::TOP_P)?;
        check("min_p", self.min_p, &ranges::MIN_P)?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            &ranges::REPEAT_PENALTY,
        )?;
        if self.repeat_last_n > MAX_REPEAT_LAST_N {
            return Err(SamplingError::OutOfRange {
                key: "repeat_last_n",
                value: f64::from(self.repeat_last_n),
                allowed: "0 to 65536",
            });
        }
        Ok(())
    }
}

/// The allowed values of the floating-point options: what [`SamplingParams::validate`] checks
/// and what the D-Bus `Capabilities` property states.
pub mod ranges {
    /// `min..=max`, or `min` excluded when [`Range::min_excluded`].
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Range {
        pub min: f32,
        /// `top_p` 0 would keep no token, a `repeat_penalty` of 0 would divide by it.
        pub min_excluded: bool,
        pub max: f32,
        /// The range as a refusal states it.
        pub words: &'static str,
    }

    impl Range {
        /// False for NaN, which no range contains.
        pub fn contains(&self, x: f32) -> bool {
            let above_min = if self.min_excluded {
                x > self.min
            } else {
                x >= self.min
            };
            above_min && x <= self.max
        }
    }

    pub const TEMPERATURE: Range = Range {
        min: 0.0,
        min_excluded: false,
        max: 10.0,
        words: "0 to 10",
    };
    pub const TOP_P: Range = Range {
        min: 0.0,
        min_excluded: true,
        max: 1.0,
        words: "above 0, up to 1",
    };
    pub const MIN_P: Range = Range {
        min: 0.0,
        min_excluded: false,
        max: 1.0,
        words: "0 to 1",
    };
    pub const REPEAT_PENALTY: Range = Range {
        min: 0.0,
        min_excluded: true,
        max: 10.0,
        words: "above 0, up to 10",
    };
}

fn check(key: &'static str, value: f32, range: &ranges::Range) -> Result<(), SamplingError> {
    if range.contains(value) {
        Ok(())
    } else {
        Err(SamplingError::OutOfRange {
            key,
            value: f64::from(value),
            allowed: range.words,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
    /// exp(logit − max), unnormalised probability, filled by the step that needs it.
    weight: f32,
}

/// Most likely first; equal logits by increasing id, so that the kept set never depends on
/// how a selection or sort algorithm orders ties.
fn most_likely_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Below this many candidates, top-p sorts what is left instead of halving it again.
const TOP_P_SORT_BELOW: usize = 64;

/// Chooses tokens for one generation: holds its random generator and its repetition window.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha20Rng,
    recent: VecDeque<u32>,
    candidates: Vec<Candidate>,
    distinct_recent: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        // A seed from the OS's randomness, without a dependency: std seeds every RandomState so.
        let seed = params
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(0u8));
        let window = params.repeat_last_n as usize;
        Ok(Self {
            params,
            seed,
            rng: ChaCha20Rng::seed_from_u64(seed),
            recent: VecDeque::with_capacity(window),
            candidates: Vec::new(),
            distinct_recent: Vec::with_capacity(window),
        })
    }

    /// The seed in use, drawn or given.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Puts tokens the sampler did not choose (the prompt) into the repetition window.
    pub fn observe(&mut self, ids: &[u32]) {
        for &id in ids {
            self.remember(id);
        }
    }

    /// Chooses the next token from `logits` (one per vocabulary id); the choice enters the
    /// repetition window. Non-finite logits (masked or broken) are never chosen.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        self.load(logits)?;
        let id = if self.params.temperature == 0.0 {
            self.argmax()
        } else {
            self.top_k();
            self.top_p();
            self.min_p();
            self.draw()
        };
        self.remember(id);
        Ok(id)
    }

    fn remember(&mut self, id: u32) {
        if self.params.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.params.repeat_last_n as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(id);
    }

    /// Fills the candidate buffer with the penalised logits, finite ones only, in id order.
    fn load(&mut self, logits: &[f32]) -> Result<(), SamplingError> {
        self.candidates.clear();
        self.candidates
            .extend((0u32..).zip(logits).map(|(id, &logit)| Candidate {
                id,
                logit,
                weight: 0.0,
            }));
        let penalty = self.params.repeat_penalty;
        if penalty != 1.0 {
            // llama.cpp penalises each recent id once, however often it occurred.
            self.distinct_recent.clear();
            self.distinct_recent.extend(&self.recent);
            self.distinct_recent.sort_unstable();
            self.distinct_recent.dedup();
            for &id in &self.distinct_recent {
                if let Some(candidate) = self.candidates.get_mut(id as usize) {
                    candidate.logit = if candidate.logit > 0.0 {
                        candidate.logit / penalty
                    } else {
                        candidate.logit * penalty
                    };
                }
            }
        }
        self.candidates
            .retain(|candidate| candidate.logit.is_finite());
        if self.candidates.is_empty() {
            return Err(SamplingError::NoFiniteLogit {
                vocab_size: logits.len(),
            });
        }
        Ok(())
    }

    /// Candidates are in id order here, so the strict comparison keeps the lowest id on a tie.
    fn argmax(&self) -> u32 {
        let mut best = self.candidates[0];
        for &candidate in &self.candidates[1..] {
            if candidate.logit > best.logit {
                best = candidate;
            }
        }
        best.id
    }

    fn max_logit(&self) -> f32 {
        self.candidates
            .iter()
            .map(|candidate| candidate.logit)
            .fold(f32::NEG_INFINITY, f32::max)
    }

    fn top_k(&mut self) {
        let k = self.params.top_k as usize;
        if k > 0 && k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, most_likely_first);
            self.candidates.truncate(k);
        }
    }

    /// Finds the nucleus by selection on probability mass: each round splits the undecided
    /// candidates at their median and keeps the half where the mass crosses `top_p`, so the
    /// cost is linear in the vocabulary whatever the nucleus size; only the last few are sorted.
    fn top_p(&mut self) {
        let top_p = f64::from(self.params.top_p);
        if top_p >= 1.0 {
            return;
        }
        let total = self.weigh(1.0);
        let target = top_p * total;
        // Candidates before `low` are in the nucleus and hold `mass`; it ends before `high`.
        let (mut low, mut high) = (0, self.candidates.len());
        let mut mass = 0.0;
        while high - low > TOP_P_SORT_BELOW {
            let middle = low + (high - low) / 2;
            self.candidates[low..high].select_nth_unstable_by(middle - low, most_likely_first);
            let upper: f64 = self.candidates[low..=middle]
                .iter()
                .map(|candidate| f64::from(candidate.weight))
                .sum();
            if mass + upper >= target {
                high = middle + 1;
            } else {
                mass += upper;
                low = middle + 1;
            }
        }
        self.candidates[low..high].sort_unstable_by(most_likely_first);
        for index in low..high {
            mass += f64::from(self.candidates[index].weight);
            if mass >= target {
                self.candidates.truncate(index + 1);
                return;
            }
        }
    }

    /// Sets each candidate's weight to exp((logit − max) / temperature); returns their sum.
    fn weigh(&mut self, temperature: f32) -> f64 {
        let max = self.max_logit();
        let inverse_temperature = 1.0 / temperature;
        let mut total = 0.0;
        for candidate in &mut self.candidates {
            candidate.weight = ((candidate.logit - max) * inverse_temperature).exp();
            total += f64::from(candidate.weight);
        }
        total
    }

    fn min_p(&mut self) {
        let min_p = self.params.min_p;
        if min_p <= 0.0 {
            return;
        }
        let threshold = self.max_logit() + min_p.ln();
        self.candidates
            .retain(|candidate| candidate.logit >= threshold);
    }

    fn draw(&mut self) -> u32 {
        let total = self.weigh(self.params.temperature);
        let mut remaining = self.rng.random::<f64>() * total;
        for candidate in &self.candidates {
            remaining -= f64::from(candidate.weight);
            if remaining < 0.0 {
                return candidate.id;
            }
        }
        // Rounding left a sliver past the last candidate: it is the one drawn.
        self.candidates[self.candidates.len() - 1].id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(temperature: f32, top_k: u32, top_p: f32, min_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: Some(seed),
        })
        .expect("valid options")
    }

    fn plain(temperature: f32, seed: u64) -> Sampler {
        seeded(temperature, 0, 1.0, 0.0, seed)
    }

    fn penalised(penalty: f32, last_n: u32) -> Sampler {
        Sampler::new(SamplingParams {
            repeat_penalty: penalty,
            repeat_last_n: last_n,
            ..SamplingParams::greedy()
        })
        .expect("valid options")
    }

    fn random_logits(rng: &mut ChaCha20Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| rng.random::<f32>() * 20.0 - 10.0)
            .collect()
    }

    fn first_argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (index, &logit) in logits.iter().enumerate() {
            if logit > logits[best] {
                best = index;
            }
        }
        best as u32
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits).unwrap() as usize] += 1;
        }
        counts
    }

    fn softmax(logits: &[f64]) -> Vec<f64> {
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|logit| (logit - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        weights.iter().map(|weight| weight / total).collect()
    }

    /// Pearson's statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], probabilities: &[f64]) -> f64 {
        let draws: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probabilities)
            .map(|(&count, &probability)| {
                let expected = probability * draws as f64;
                (count as f64 - expected).powi(2) / expected
            })
            .sum()
    }

    #[test]
    fn greedy_is_the_first_argmax_on_a_full_vocabulary() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        for _ in 0..20 {
            let logits = random_logits(&mut rng, 32000);
            assert_eq!(sampler.sample(&logits).unwrap(), first_argmax(&logits));
        }
        assert_eq!(
            sampler.sample(&[1.0, 3.0, 3.0, 0.0]).unwrap(),
            1,
            "lowest id on a tie"
        );
    }

    #[test]
    fn non_finite_logits_are_never_chosen() {
        let logits = [f32::NAN, f32::NEG_INFINITY, 0.5, 0.2, f32::NAN];
        assert_eq!(
            Sampler::new(SamplingParams::greedy())
                .unwrap()
                .sample(&logits)
                .unwrap(),
            2
        );
        let mut sampler = plain(1.0, 5);
        assert_eq!(counts(&mut sampler, &logits, 500)[..2], [0, 0]);
        let error = sampler.sample(&[f32::NAN, f32::NEG_INFINITY]).unwrap_err();
        assert_eq!(error, SamplingError::NoFiniteLogit { vocab_size: 2 });
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let steps: Vec<Vec<f32>> = (0..200).map(|_| random_logits(&mut rng, 500)).collect();
        let run = |seed| {
            let mut sampler = seeded(1.0, 50, 0.9, 0.01, seed);
            steps
                .iter()
                .map(|logits| sampler.sample(logits).unwrap())
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn a_drawn_seed_is_reported_and_replays_the_run() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let logits = random_logits(&mut rng, 100);
        let params = SamplingParams {
            temperature: 2.0,
            seed: None,
            ..SamplingParams::default()
        };
        let mut first = Sampler::new(params.clone()).unwrap();
        let mut replay = Sampler::new(SamplingParams {
            seed: Some(first.seed()),
            ..params
        })
        .unwrap();
        let tokens: Vec<u32> = (0..50).map(|_| first.sample(&logits).unwrap()).collect();
        let replayed: Vec<u32> = (0..50).map(|_| replay.sample(&logits).unwrap()).collect();
        assert_eq!(tokens, replayed);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let mut sampler = seeded(1.5, 1, 1.0, 0.0, 1);
        for _ in 0..50 {
            let logits = random_logits(&mut rng, 32000);
            assert_eq!(sampler.sample(&logits).unwrap(), first_argmax(&logits));
        }
    }

    #[test]
    fn top_k_draws_only_among_the_k_most_likely() {
        let mut rng = ChaCha20Rng::seed_from_u64(14);
        let logits = random_logits(&mut rng, 32000);
        let mut order: Vec<u32> = (0..32000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top: std::collections::HashSet<u32> = order[..40].iter().copied().collect();
        let mut sampler = seeded(5.0, 40, 1.0, 0.0, 2);
        let drawn: std::collections::HashSet<u32> = (0..2000)
            .map(|_| sampler.sample(&logits).unwrap())
            .collect();
        assert!(drawn.is_subset(&top));
        assert!(
            drawn.len() > 30,
            "a hot temperature reaches most of the 40: {}",
            drawn.len()
        );
    }

    #[test]
    fn temperature_sampling_follows_the_tempered_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, -1.0];
        for (temperature, seed) in [(0.7f32, 21), (1.0, 22), (2.5, 23)] {
            let scaled: Vec<f64> = logits
                .iter()
                .map(|&l| f64::from(l) / f64::from(temperature))
                .collect();
            let observed = counts(&mut plain(temperature, seed), &logits, 20_000);
            // 4 degrees of freedom: 18.47 is the 0.999 quantile.
            let statistic = chi_square(&observed, &softmax(&scaled));
            assert!(
                statistic < 18.47,
                "temperature {temperature}: χ² = {statistic}, counts {observed:?}"
            );
        }
        let cold = counts(&mut plain(0.3, 24), &logits, 5000);
        let hot = counts(&mut plain(3.0, 24), &logits, 5000);
        assert!(
            cold[2] > hot[2] && cold[4] < hot[4],
            "cold {cold:?}, hot {hot:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // Shuffled ids, so the order of the logits does not help.
        let probabilities = [0.05f64, 0.3, 0.15, 0.5];
        let logits: Vec<f32> = probabilities.iter().map(|p| p.ln() as f32).collect();
        let observed = counts(&mut seeded(1.0, 0, 0.75, 0.0, 31), &logits, 10_000);
        assert_eq!([observed[0], observed[2]], [0, 0], "{observed:?}");
        let statistic = chi_square(&[observed[1], observed[3]], &[0.3 / 0.8, 0.5 / 0.8]);
        assert!(statistic < 10.83, "χ² = {statistic}, counts {observed:?}");
    }

    #[test]
    fn top_p_with_a_wide_nucleus_on_a_full_vocabulary() {
        // Slowly falling logits: the nucleus holds thousands of ids, past the first sorted batch.
        let logits: Vec<f32> = (0..32000).map(|id| -(id as f32) * 2e-4).collect();
        let probabilities = softmax(&logits.iter().map(|&l| f64::from(l)).collect::<Vec<_>>());
        let mut mass = 0.0;
        let nucleus = probabilities
            .iter()
            .position(|p| {
                mass += p;
                mass >= 0.5
            })
            .unwrap() as u32
            + 1;
        assert!(nucleus > 1000);
        let mut sampler = seeded(1.0, 0, 0.5, 0.0, 32);
        let drawn: Vec<u32> = (0..400).map(|_| sampler.sample(&logits).unwrap()).collect();
        assert!(
            drawn.iter().all(|&id| id < nucleus),
            "nucleus of {nucleus} ids"
        );
        assert!(
            drawn.iter().any(|&id| id > nucleus * 9 / 10),
            "the whole nucleus is reachable"
        );
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_most_likely() {
        let probabilities = [0.15f64, 0.05, 0.5, 0.3];
        let logits: Vec<f32> = probabilities.iter().map(|p| p.ln() as f32).collect();
        let observed = counts(&mut seeded(1.0, 0, 1.0, 0.2, 41), &logits, 10_000);
        assert_eq!(observed[1], 0, "0.05 < 0.2 × 0.5: {observed:?}");
        let statistic = chi_square(
            &[observed[0], observed[2], observed[3]],
            &[0.15 / 0.95, 0.5 / 0.95, 0.3 / 0.95],
        );
        assert!(statistic < 13.82, "χ² = {statistic}, counts {observed:?}");
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut sampler = penalised(2.0, 64);
        sampler.observe(&[0]);
        assert_eq!(
            sampler.sample(&[2.0, 1.5, -0.5]).unwrap(),
            1,
            "2.0 / 2 < 1.5"
        );

        let mut sampler = penalised(1.5, 64);
        sampler.observe(&[0]);
        assert_eq!(
            sampler.sample(&[-1.0, -1.2]).unwrap(),
            1,
            "-1.0 × 1.5 < -1.2"
        );
    }

    #[test]
    fn repeat_penalty_counts_a_token_once_and_only_in_the_window() {
        let mut sampler = penalised(2.0, 64);
        sampler.observe(&[0, 0, 0]);
        assert_eq!(
            sampler.sample(&[2.0, 0.9]).unwrap(),
            0,
            "penalised once: 1.0 > 0.9"
        );

        let mut sampler = penalised(2.0, 2);
        sampler.observe(&[0, 5, 1]);
        assert_eq!(
            sampler.sample(&[2.0, 1.5]).unwrap(),
            0,
            "0 has left the window of 2"
        );
    }

    #[test]
    fn sampled_tokens_enter_the_repetition_window() {
        let mut sampler = penalised(10.0, 3);
        let logits = [3.0, 2.9, 2.8];
        let tokens: Vec<u32> = (0..4).map(|_| sampler.sample(&logits).unwrap()).collect();
        assert_eq!(tokens, [0, 1, 2, 0]);
    }

    #[test]
    fn out_of_range_options_are_named_with_their_range() {
        let cases: [(&str, SamplingParams); 10] = [
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: 11.0,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: -0.1,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.1,
                    ..Default::default()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "repeat_last_n",
                SamplingParams {
                    repeat_last_n: MAX_REPEAT_LAST_N + 1,
                    ..Default::default()
                },
            ),
        ];
        for (key, params) in cases {
            let error = Sampler::new(params).unwrap_err();
            let SamplingError::OutOfRange {
                key: named,
                allowed,
                ..
            } = &error
            else {
                panic!("{error:?}");
            };
            assert_eq!(*named, key);
            let message = error.to_string();
            assert!(
                message.contains(key) && message.contains(allowed),
                "{message}"
            );
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
    }
}
