//! The keys or the values of one attention layer, kept across the steps of a session.
//!
//! One anonymous mapping per layer and per keys/values, sized for the bundle's whole context
//! and never moved: the kernel hands out zero pages on first write, so what is resident is what
//! has been written, and a step appends its positions without copying the past. tract's in-place
//! cache doubles its buffer as it fills, and the allocator serves the doubled buffer from memory
//! that earlier chunks had touched: on the 7B shape at position 1040, 80 MiB beyond the keys and
//! values themselves were resident.

use memmap2::MmapMut;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_ndarray::{ArrayView4, s};

/// Keys or values `[batch, heads, positions, dim]` in an anonymous mapping with room for
/// `capacity` positions, allocated at the first push (when the other sizes are known).
#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    map: Option<MmapMut>,
    /// `[batch, heads, capacity, dim]`.
    shape: [usize; 4],
    len: usize,
}

impl Clone for KvCache {
    /// A copy of the valid positions (tract clones states only to fork a session).
    fn clone(&self) -> Self {
        let mut copy = KvCache::new(self.capacity);
        if let Ok(view) = self.view() {
            copy.push_view(view)
                .expect("a copy fits where the original did");
        }
        copy
    }
}

impl KvCache {
    pub fn new(capacity: usize) -> Self {
        KvCache {
            capacity,
            map: None,
            shape: [0; 4],
            len: 0,
        }
    }

    /// Appends a step's positions (`[batch, heads, new, dim]`).
    pub fn push_view(&mut self, input: ArrayView4<f32>) -> TractResult<()> {
        let (batch, heads, new, dim) = input.dim();
        if self.map.is_none() {
            let bytes = batch * heads * self.capacity * dim * size_of::<f32>();
            self.map = Some(MmapMut::map_anon(bytes.max(1))?);
            self.shape = [batch, heads, self.capacity, dim];
        }
        ensure!(
            [batch, heads, dim] == [self.shape[0], self.shape[1], self.shape[3]],
            "KV cache of shape {:?} fed {:?}",
            self.shape,
            input.dim()
        );
        ensure!(
            self.len + new <= self.capacity,
            "KV cache full: {} + {new} positions exceed the context of {}",
            self.len,
            self.capacity
        );
        let map = self.map.as_mut().expect("allocated above");
        let data: &mut [f32] = bytemuck::cast_slice_mut(&mut map[..]);
        for b in 0..batch {
            for h in 0..heads {
                let first = ((b * heads + h) * self.capacity + self.len) * dim;
                let rows = &mut data[first..first + new * dim];
                for (row, source) in rows
                    .chunks_exact_mut(dim)
                    .zip(input.slice(s![b, h, .., ..]).rows())
                {
                    row.iter_mut().zip(source).for_each(|(r, s)| *r = *s);
                }
            }
        }
        self.len += new;
        Ok(())
    }

    /// Forgets the positions from `keep` on; the next push writes over them.
    pub fn truncate(&mut self, keep: usize) {
        self.len = self.len.min(keep);
    }

    /// `[batch, heads, positions, dim]` of the positions written, or `None` before the first push.
    pub fn valid_shape(&self) -> Option<[usize; 4]> {
        self.map.as_ref()?;
        let [batch, heads, _, dim] = self.shape;
        Some([batch, heads, self.len, dim])
    }

    /// The positions written, `[batch, heads, positions, dim]`.
    pub fn view(&self) -> TractResult<ArrayView4<'_, f32>> {
        let full = ArrayView4::from_shape(self.shape, self.slots()?)?;
        Ok(full.slice_move(s![.., .., ..self.len, ..]))
    }

    /// The whole mapping, `[batch, heads, capacity, dim]` row-major, of which the first
    /// [`Self::positions`] of each head are written: what the attention kernel reads in place.
    pub fn slots(&self) -> TractResult<&[f32]> {
        let map = self.map.as_ref().context("empty KV cache")?;
        Ok(bytemuck::cast_slice(&map[..]))
    }

    /// `[batch, heads, capacity, dim]`, zeros before the first push.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Positions written.
    pub fn positions(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::tract_ndarray::Array4;

    /// Distinct values from `first` on, so that any misplaced position shows.
    fn counting(shape: (usize, usize, usize, usize), first: f32) -> Array4<f32> {
        let mut next = first;
        Array4::from_shape_fn(shape, |_| {
            next += 1.0;
            next
        })
    }

    /// Pushes land after each other, per head, and the view shows exactly the valid positions;
    /// a push past the context is an error, not a wrap.
    #[test]
    fn the_cache_appends_in_place_and_refuses_to_overflow() {
        let first = counting((1, 2, 3, 4), 0.0);
        let second = counting((1, 2, 2, 4), 100.0);
        let mut cache = KvCache::new(5);
        cache.push_view(first.view()).unwrap();
        cache.push_view(second.view()).unwrap();
        let view = cache.view().unwrap();
        assert_eq!(view.dim(), (1, 2, 5, 4));
        assert_eq!(view.slice(s![.., .., ..3, ..]), first);
        assert_eq!(view.slice(s![.., .., 3.., ..]), second);
        assert_eq!(cache.valid_shape(), Some([1, 2, 5, 4]));
        assert_eq!(cache.clone().view().unwrap(), view);
        let error = cache
            .push_view(counting((1, 2, 1, 4), 200.0).view())
            .unwrap_err();
        assert!(error.to_string().contains("KV cache full"), "{error}");
        let mut other = KvCache::new(5);
        other.push_view(first.view()).unwrap();
        let error = other
            .push_view(counting((1, 3, 1, 4), 300.0).view())
            .unwrap_err();
        assert!(error.to_string().contains("fed"), "{error}");
    }
}
