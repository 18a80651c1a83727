//! Comparing logits between engines.

/// The index of the largest logit (the greedy choice); ties go to the last.
#[track_caller]
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .expect("non-empty logits")
}

/// The largest `|a[i] - b[i]|`, NaN when any difference is NaN: `f32::max` would drop a NaN,
/// and logits that are NaN on either side must never compare as close.
#[track_caller]
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "comparing logits of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |worst, d| {
            if worst.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                worst.max(d)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_on_either_side_is_never_close() {
        assert!(max_abs_diff(&[f32::NAN, 1.0], &[0.0, 1.0]).is_nan());
        assert!(max_abs_diff(&[0.0, 1.0], &[0.0, f32::NAN]).is_nan());
        assert_eq!(max_abs_diff(&[0.0, 1.0], &[0.5, -1.0]), 2.0);
    }

    #[test]
    fn argmax_picks_the_largest() {
        assert_eq!(argmax(&[0.0, 3.0, -1.0]), 1);
    }
}
