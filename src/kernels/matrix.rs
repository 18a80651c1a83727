//! The borrowed view of an FP8 weight matrix that every kernel takes, validated once so that the
//! kernels themselves can index without checks.

use super::Isa;

/// Scale blocks are processed in whole 16-weight steps by the vector kernels.
pub const BLOCK_GRANULE: usize = 16;

/// Why a kernel refused its operands. Messages name the sizes involved; the caller adds the
/// tensor's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("FP8 matrix has an empty shape {rows}×{cols}")]
    Empty { rows: usize, cols: usize },
    #[error("FP8 matrix shape {rows}×{cols} overflows the address space")]
    TooLarge { rows: usize, cols: usize },
    #[error("FP8 matrix of {rows}×{cols} needs {expected} weight bytes, got {actual}")]
    WeightBytes {
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error(
        "scale block of {block} weights must be a positive multiple of {BLOCK_GRANULE} \
         dividing the row length {cols}"
    )]
    Block { block: usize, cols: usize },
    #[error("FP8 matrix of {rows}×{cols} needs {expected} scales, got {actual}")]
    Scales {
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("{operand} has {actual} elements, expected {expected}")]
    Operand {
        operand: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("the kernels' thread pool already has {current} threads")]
    ThreadsAlreadySet { current: usize },
    #[error("row {row} is out of range for an FP8 matrix of {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("{0:?} is not the shape of a decode step's attention")]
    AttentionShape(super::attention::AttentionShape),
    #[error("{0:?} kernels are not available on this CPU")]
    IsaUnavailable(Isa),
}

/// An FP8 E4M3FN matrix `[rows, cols]`, row-major: one output channel per row, contiguous along
/// the reduction axis. Borrowed, so it can point straight into mapped weights.
///
/// Scales are f32, either one per row (`block: None`) or one per `block` consecutive weights of a
/// row (`[rows, cols / block]`, row-major). A weight's value is `e4m3(byte) · scale`.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Matrix<'a> {
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    scales: &'a [f32],
    block: Option<usize>,
}

impl<'a> Fp8Matrix<'a> {
    /// Checks that the sizes agree. `block` must be a multiple of [`BLOCK_GRANULE`] that divides
    /// `cols`.
    pub fn new(
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
        scales: &'a [f32],
        block: Option<usize>,
    ) -> Result<Self, KernelError> {
        if rows == 0 || cols == 0 {
            return Err(KernelError::Empty { rows, cols });
        }
        let expected = rows
            .checked_mul(cols)
            .ok_or(KernelError::TooLarge { rows, cols })?;
        if bytes.len() != expected {
            return Err(KernelError::WeightBytes {
                rows,
                cols,
                expected,
                actual: bytes.len(),
            });
        }
        let scales_per_row = match block {
            None => 1,
            Some(block) => {
                if block == 0 || !block.is_multiple_of(BLOCK_GRANULE) || !cols.is_multiple_of(block)
                {
                    return Err(KernelError::Block { block, cols });
                }
                cols / block
            }
        };
        let expected = rows * scales_per_row;
        if scales.len() != expected {
            return Err(KernelError::Scales {
                rows,
                cols,
                expected,
                actual: scales.len(),
            });
        }
        Ok(Self {
            bytes,
            rows,
            cols,
            scales,
            block,
        })
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Reduction length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Weights per scale along a row, or `None` for one scale per row.
    pub fn block(&self) -> Option<usize> {
        self.block
    }

    /// The FP8 codes of one row.
    pub(crate) fn row_bytes(&self, row: usize) -> &'a [u8] {
        &self.bytes[row * self.cols..(row + 1) * self.cols]
    }

    /// The scales of one row: one entry, or one per block.
    pub(crate) fn row_scales(&self, row: usize) -> &'a [f32] {
        let per_row = self.scales.len() / self.rows;
        &self.scales[row * per_row..(row + 1) * per_row]
    }

    /// Weights covered by each entry of [`Self::row_scales`].
    pub(crate) fn scale_span(&self) -> usize {
        self.block.unwrap_or(self.cols)
    }

    pub(crate) fn check_operand(
        operand: &'static str,
        actual: usize,
        expected: usize,
    ) -> Result<(), KernelError> {
        if actual == expected {
            Ok(())
        } else {
            Err(KernelError::Operand {
                operand,
                expected,
                actual,
            })
        }
    }
}

/// Walks the scale blocks of a row [`BLOCK_GRANULE`] columns at a time, without a division per
/// step: vector kernels ask it for the scale of each granule in turn.
pub(crate) struct ScaleCursor {
    index: usize,
    left: usize,
    granules_per_block: usize,
    last: usize,
}

impl ScaleCursor {
    pub(crate) fn new(w: &Fp8Matrix) -> Self {
        let granules_per_block = w.scale_span() / BLOCK_GRANULE;
        let last = w.cols() / w.scale_span() - 1;
        Self {
            index: 0,
            left: granules_per_block,
            granules_per_block,
            last,
        }
    }

    /// The scale index of the next granule (the last block's for padding past the row's end).
    pub(crate) fn next(&mut self) -> usize {
        let index = self.index.min(self.last);
        self.left -= 1;
        if self.left == 0 {
            self.index += 1;
            self.left = self.granules_per_block;
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_mismatch() {
        let bytes = [0u8; 64];
        let scales = [1.0f32; 4];
        assert!(Fp8Matrix::new(&bytes, 2, 32, &scales[..2], None).is_ok());
        assert!(Fp8Matrix::new(&bytes, 2, 32, &scales, Some(16)).is_ok());
        assert_eq!(
            Fp8Matrix::new(&bytes, 3, 32, &scales[..3], None).unwrap_err(),
            KernelError::WeightBytes {
                rows: 3,
                cols: 32,
                expected: 96,
                actual: 64
            }
        );
        assert_eq!(
            Fp8Matrix::new(&bytes, 2, 32, &scales, None).unwrap_err(),
            KernelError::Scales {
                rows: 2,
                cols: 32,
                expected: 2,
                actual: 4
            }
        );
        assert_eq!(
            Fp8Matrix::new(&bytes, 2, 32, &scales, Some(8)).unwrap_err(),
            KernelError::Block { block: 8, cols: 32 }
        );
        assert_eq!(
            Fp8Matrix::new(&bytes[..48], 1, 48, &scales[..1], Some(32)).unwrap_err(),
            KernelError::Block {
                block: 32,
                cols: 48
            }
        );
        assert_eq!(
            Fp8Matrix::new(&bytes[..0], 0, 32, &scales[..0], None).unwrap_err(),
            KernelError::Empty { rows: 0, cols: 32 }
        );
        assert_eq!(
            Fp8Matrix::new(&bytes, usize::MAX, 2, &scales, None).unwrap_err(),
            KernelError::TooLarge {
                rows: usize::MAX,
                cols: 2
            }
        );
        let message = KernelError::Block { block: 8, cols: 32 }.to_string();
        assert!(message.contains("multiple of 16"), "{message}");
    }
}
