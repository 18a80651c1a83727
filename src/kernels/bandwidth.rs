//! The machine's memory read bandwidth: the ceiling for a decode step, which reads every weight
//! once per token. Benchmarks report kernel speed as a fraction of it.

use std::hint::black_box;
use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::pool;
use super::prefetch::{LINE, prefetch};

/// Passes over the buffer; the fastest counts, as the one least disturbed by other work.
const PASSES: usize = 5;

/// How far ahead of the sum the prefetching pass asks for lines: one page, since the
/// hardware prefetcher alone restarts at every page.
const PREFETCH_AHEAD: usize = 4096;

/// Bytes per second that the threads of the current kernel pool read when streaming through a
/// buffer of `buffer_bytes`, best of a few passes, each read both plainly and with software
/// prefetch (whichever is faster: the ceiling must not be lower than what a kernel that
/// prefetches its rows reaches). Make the buffer much larger than the last-level cache
/// (1 GiB is a good size) so that the figure is DRAM's, not the cache's. Run it inside
/// [`super::Pool::install`] to choose the thread count.
pub fn measure_read_bandwidth(buffer_bytes: usize) -> f64 {
    // Non-zero contents: a zeroed allocation could be served from the shared zero page.
    let buffer = vec![1u64; (buffer_bytes / 8).max(1)];
    let bytes = buffer.len() * 8;
    let chunk = buffer.len().div_ceil(pool::threads());
    let mut best = 0.0f64;
    for _ in 0..PASSES {
        for sum in [sum_words, sum_words_prefetched, sum_words_streams] {
            let start = Instant::now();
            let total = AtomicU64::new(0);
            pool::run(buffer.len().div_ceil(chunk), |index| {
                let words = &buffer[index * chunk..((index + 1) * chunk).min(buffer.len())];
                total.fetch_add(sum(words), Relaxed);
            });
            let seconds = start.elapsed().as_secs_f64();
            black_box(total.into_inner());
            best = best.max(bytes as f64 / seconds);
        }
    }
    best
}

/// Concurrent streams per thread in [`sum_words_streams`].
const STREAMS: usize = 4;

/// [`sum_words`] over [`STREAMS`] parts of `words` read side by side, a line of each in turn:
/// more reads in flight than one stream keeps, as a kernel walking several rows has.
fn sum_words_streams(words: &[u64]) -> u64 {
    let line_words = LINE / 8;
    let part = words.len().div_ceil(STREAMS).next_multiple_of(line_words);
    let parts: Vec<&[u64]> = words.chunks(part).collect();
    let mut lanes = [0u64; 8];
    for line in (0..part).step_by(line_words) {
        for part in &parts {
            if let Some(words) = part.get(line..(line + line_words).min(part.len())) {
                for (lane, &word) in lanes.iter_mut().zip(words) {
                    *lane = lane.wrapping_add(word);
                }
            }
        }
    }
    lanes.iter().fold(0, |sum, &lane| sum.wrapping_add(lane))
}

/// [`sum_words`] a page at a time, each page's lines prefetched while the one before is summed.
fn sum_words_prefetched(words: &[u64]) -> u64 {
    let page_words = PREFETCH_AHEAD / 8;
    let mut total = 0u64;
    for (index, page) in words.chunks(page_words).enumerate() {
        let next = words
            .as_ptr()
            .wrapping_add((index + 1) * page_words)
            .cast::<u8>();
        for offset in (0..PREFETCH_AHEAD).step_by(LINE) {
            prefetch(next.wrapping_add(offset));
        }
        total = total.wrapping_add(sum_words(page));
    }
    total
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
        let words: Vec<u64> = (1..=3000).collect();
        assert_eq!(sum_words_prefetched(&words), 3000 * 3001 / 2);
        assert_eq!(sum_words_streams(&words), 3000 * 3001 / 2);
    }
}
