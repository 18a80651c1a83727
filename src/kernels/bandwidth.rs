//! The machine's memory read bandwidth: the ceiling for a decode step, which reads every weight
//! once per token. Benchmarks report kernel speed as a fraction of it.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

/// Passes over the buffer; the fastest counts, as the one least disturbed by other work.
const PASSES: usize = 5;

/// Bytes per second that the threads of the current rayon pool read when streaming through a
/// buffer of `buffer_bytes`, best of a few passes. Make the buffer much larger than the last-level
/// cache (1 GiB is a good size) so that the figure is DRAM's, not the cache's. Run it inside
/// [`rayon::ThreadPool::install`] to choose the thread count.
pub fn measure_read_bandwidth(buffer_bytes: usize) -> f64 {
    // Non-zero contents: a zeroed allocation could be served from the shared zero page.
    let buffer = vec![1u64; (buffer_bytes / 8).max(1)];
    let bytes = buffer.len() * 8;
    let chunk = buffer.len().div_ceil(rayon::current_num_threads());
    let mut best = 0.0f64;
    for _ in 0..PASSES {
        let start = Instant::now();
        let sum = buffer
            .par_chunks(chunk)
            .map(sum_words)
            .reduce(|| 0, u64::wrapping_add);
        let seconds = start.elapsed().as_secs_f64();
        black_box(sum);
        best = best.max(bytes as f64 / seconds);
    }
    best
}

/// A sum the compiler can vectorize, so that arithmetic never limits the reading.
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = words.chunks_exact(lanes.len());
    for chunk in &mut chunks {
        for (lane, &word) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(word);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |sum, &word| sum.wrapping_add(word));
    lanes.iter().fold(tail, |sum, &lane| sum.wrapping_add(lane))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_finite() {
        let bandwidth = measure_read_bandwidth(1 << 20);
        assert!(bandwidth.is_finite() && bandwidth > 0.0, "{bandwidth}");
    }

    #[test]
    fn sum_counts_every_word() {
        let words: Vec<u64> = (1..=37).collect();
        assert_eq!(sum_words(&words), 37 * 38 / 2);
    }
}
