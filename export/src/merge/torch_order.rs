//! The two f32 reductions of mergekit's SLERP, summed in the order PyTorch's CPU kernels sum.
//!
//! A float sum depends on its order, and SLERP's two coefficients come from a norm and a dot
//! product over millions of elements: one different last bit there moves the coefficients, and
//! the bf16 rounding of the merged weights follows. Summing in PyTorch's order makes marengo's
//! coefficients the same f32 values mergekit gets. Both orders were read from PyTorch's source
//! (`aten/src/ATen/native/cpu/ReduceOpsKernel.cpp`, `SumKernel.cpp`) and checked against torch
//! 2.15 on x86-64 (AVX2 and AVX-512 machines use the same 8-lane code for these kernels),
//! including the tails that GCC compiles in its own way:
//!
//! - `vector_norm(x, 2)` over a contiguous last dimension: eight lanes, each `lane + x*x` with
//!   the product rounded (no fused multiply-add), the lanes folded left to right, then the
//!   `len % 8` remainder: whole groups of four as `acc + x*x`, the last `len % 4` as a fused
//!   multiply-add, then `sqrt`. A single element is `abs` (torch's shortcut).
//! - `sum` over a contiguous last dimension (the "cascade sum"): eight-lane vectors summed by
//!   four interleaved accumulators with four levels of partial sums (a level flushes into the
//!   next every 2^4 rows), the accumulators folded, the scalar remainder summed first and the
//!   eight lanes added after it; fewer than eight elements take the same cascade on scalars.
//!
//! PyTorch splits one sum across its threads when it has more than 32768 elements and adds the
//! per-thread partial sums, so mergekit's own coefficients for large tensors depend on
//! `torch.get_num_threads()`. These functions follow the single-thread order, which is the same
//! on every machine.

/// Elements in one of PyTorch's `Vectorized<float>` on AVX2 (the width these kernels use).
const LANES: usize = 8;
/// Interleaved accumulators of `row_sum` (`ilp_factor`).
const ILP: usize = 4;
/// Levels of partial sums in `multi_row_sum`.
const LEVELS: usize = 4;

/// Euclidean norm of `x`, rounded as `torch.linalg.vector_norm(x, dim=-1)` rounds it.
pub fn norm(x: &[f32]) -> f32 {
    if x.len() == 1 {
        return x[0].abs();
    }
    let full = x.len() - x.len() % LANES;
    let mut lanes = [0f32; LANES];
    for v in x[..full].chunks_exact(LANES) {
        for (lane, &e) in lanes.iter_mut().zip(v) {
            *lane += e * e;
        }
    }
    let mut acc = lanes[0];
    for &lane in &lanes[1..] {
        acc += lane;
    }
    let tail = &x[full..];
    let fours = tail.len() / 4 * 4;
    for &e in &tail[..fours] {
        acc += e * e;
    }
    for &e in &tail[fours..] {
        acc = e.mul_add(e, acc);
    }
    acc.sqrt()
}

/// Sum of `x`, rounded as `torch.sum(x, dim=-1)` rounds it on one thread.
pub fn sum(x: &[f32]) -> f32 {
    let total = if x.len() >= LANES {
        let (vectors, rest) = x.as_chunks::<LANES>();
        let lanes = row_sum(vectors);
        let mut acc = 0f32;
        for &e in rest {
            acc += e;
        }
        for lane in lanes {
            acc += lane;
        }
        acc
    } else {
        row_sum(x)
    };
    // The output starts at zero and the kernel accumulates into it.
    0.0 + total
}

/// A value `row_sum` accumulates: one f32, or one vector of lanes.
trait Acc: Copy {
    const ZERO: Self;
    fn add(self, other: Self) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Acc for [f32; LANES] {
    const ZERO: Self = [0.0; LANES];
    fn add(mut self, other: Self) -> Self {
        for (a, b) in self.iter_mut().zip(other) {
            *a += b;
        }
        self
    }
}

/// `row_sum`: the values as rows of `ILP` interleaved columns, cascaded, then the leftover
/// values into column 0, then the columns folded.
fn row_sum<V: Acc>(values: &[V]) -> V {
    let rows = values.len() / ILP;
    let mut columns = multi_row_sum(&values[..rows * ILP], rows);
    for &v in &values[rows * ILP..] {
        columns[0] = columns[0].add(v);
    }
    let mut acc = columns[0];
    for &column in &columns[1..] {
        acc = acc.add(column);
    }
    acc
}

/// `multi_row_sum`: per column, level 0 adds 2^p rows, then each level adds into the next and
/// restarts; a level's carry stops at the first level whose block is not yet complete.
fn multi_row_sum<V: Acc>(values: &[V], rows: usize) -> [V; ILP] {
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[V::ZERO; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for (k, slot) in acc[0].iter_mut().enumerate() {
                *slot = slot.add(values[i * ILP + k]);
            }
            i += 1;
        }
        for level in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(level);
            for (carry, slot) in lower[level - 1].iter_mut().zip(upper[0].iter_mut()) {
                *slot = slot.add(*carry);
                *carry = V::ZERO;
            }
            if i & (mask << (level * power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for (k, slot) in acc[0].iter_mut().enumerate() {
            *slot = slot.add(values[i * ILP + k]);
        }
        i += 1;
    }
    let mut out = acc[0];
    for level in acc.iter().skip(1) {
        for (o, &v) in out.iter_mut().zip(level) {
            *o = o.add(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs whose sum is exact in f32 come out exact, whatever the order.
    #[test]
    fn exact_sums_are_exact() {
        for n in [0usize, 1, 3, 7, 8, 9, 31, 32, 33, 1000, 70_000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
            let exact: i64 = (0..n).map(|i| (i % 17) as i64 - 8).sum();
            assert_eq!(sum(&x), exact as f32, "n = {n}");
            let squares: i64 = (0..n).map(|i| ((i % 17) as i64 - 8).pow(2)).sum();
            assert_eq!(norm(&x), (squares as f32).sqrt(), "n = {n}");
        }
    }

    /// The cascade is not a left-to-right sum: 2^24 followed by ones loses a different number
    /// of ones depending on where they meet it. Left to right loses all of them; the figures
    /// are what `torch.sum` (torch 2.15, x86-64) gives for `[2^24, 1, 1, …]` of each length.
    #[test]
    fn sum_keeps_torchs_order_not_left_to_right() {
        for (n, kept) in [
            (8usize, 0.0f32),
            (16, 14.0),
            (32, 28.0),
            (33, 28.0),
            (64, 62.0),
            (100, 100.0),
            (1000, 980.0),
        ] {
            let mut x = vec![1.0f32; n];
            x[0] = 16_777_216.0;
            assert_eq!(x.iter().fold(0f32, |a, &b| a + b), 16_777_216.0);
            assert_eq!(sum(&x) - 16_777_216.0, kept, "n = {n}");
        }
    }
}
