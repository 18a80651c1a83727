//! The reference the attention kernels are tested against: the definition, per query head, in
//! f64 with the library's `exp`, with no task split, no shared key-value loads and no
//! approximation.

use super::AttentionShape;

pub(super) fn decode(
    shape: AttentionShape,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let AttentionShape {
        query_heads,
        kv_heads,
        dim,
        start,
        len,
        capacity,
        ..
    } = shape;
    let group = query_heads / kv_heads;
    for (index, (query, out)) in queries
        .chunks_exact(dim)
        .zip(out.chunks_exact_mut(dim))
        .enumerate()
    {
        let (b, query_head) = (index / query_heads, index % query_heads);
        let first = ((b * kv_heads + query_head / group) * capacity + start) * dim;
        let rows = first..first + (len - start) * dim;
        let (keys, values) = (&keys[rows.clone()], &values[rows]);
        let scores: Vec<f64> = keys
            .chunks_exact(dim)
            .map(|key| {
                let dot: f64 = query
                    .iter()
                    .zip(key)
                    .map(|(&q, &k)| f64::from(q) * f64::from(k))
                    .sum();
                dot * f64::from(scale)
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (d, out) in out.iter_mut().enumerate() {
            let weighted: f64 = weights
                .iter()
                .zip(values.chunks_exact(dim))
                .map(|(w, value)| w * f64::from(value[d]))
                .sum();
            *out = (weighted / total) as f32;
        }
    }
}
