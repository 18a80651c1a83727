//! A per-thread f32 buffer for a kernel's reordered copy of its input, so that a decode step's
//! few hundred matrix-vector products allocate nothing: the buffer is taken from the thread,
//! used for one call and given back.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

thread_local! {
    static BUFFER: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The thread's buffer while a kernel uses it; back to the thread when dropped. A second one
/// taken meanwhile on the same thread starts empty (and allocates), so nesting stays correct.
pub(super) struct Scratch(Vec<f32>);

impl Scratch {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Scratch {
        let mut buffer = BUFFER.take();
        buffer.clear();
        buffer.resize(len, 0.0);
        Scratch(buffer)
    }
}

impl Deref for Scratch {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        BUFFER.set(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_reused_and_zeroed() {
        let first = {
            let mut scratch = Scratch::zeroed(100);
            scratch[7] = 1.0;
            scratch.as_ptr()
        };
        let scratch = Scratch::zeroed(50);
        assert_eq!(scratch.as_ptr(), first, "the same allocation again");
        assert!(scratch.iter().all(|&v| v == 0.0));
        let nested = Scratch::zeroed(10);
        assert_ne!(nested.as_ptr(), first);
        assert_eq!(nested.len(), 10);
    }
}
