//! FP8 E4M3FN × f32 linear-algebra kernels: the arithmetic under every quantized linear layer.
//!
//! Weights stay in their 8-bit mapped form; each kernel widens them on the fly. Decoding a whole
//! token is a chain of matrix-vector products whose speed is the memory bandwidth, so
//! [`Fp8Matrix::matvec`] splits rows across the kernels' thread pool ([`pool`]) and does as little per weight as
//! the CPU allows; a prompt is a matrix product, where [`Fp8Matrix::matmul`] dequantizes a panel of
//! weights once and reuses it for every token. A few tokens (a short prompt or chunk) would not
//! fill the panels' register tiles, so up to a measured threshold each weight is instead widened
//! in registers once and multiplied into one accumulator per token (the small-batch kernel).
//!
//! Each instruction set has its own file, selected at run time ([`Isa::best`]), and all are tested
//! against one scalar reference written from the E4M3 definition ([`e4m3::value`]). The thread
//! count is that of the pool the call runs in: the process-wide one ([`pool::set_threads`]), or
//! one a caller chose with [`Pool::install`].
//!
//! The decode step's attention ([`attention`]) follows the same pattern over f32 slices.
//!
//! This module knows nothing of models or graphs.

pub mod attention;
mod bandwidth;
pub mod e4m3;
mod matrix;
mod parallel;
pub mod pool;
mod portable;
mod prefetch;
mod scalar;
mod scratch;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests;

pub use bandwidth::measure_read_bandwidth;
pub use matrix::{BLOCK_GRANULE, Fp8Matrix, KernelError};
pub use pool::Pool;

use parallel::Backend;

/// An implementation of the kernels, named after the instruction set it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// The reference: decodes each weight from the E4M3 definition and accumulates in f64.
    /// Slow, single-threaded, and the yardstick for the others.
    Scalar,
    /// Plain Rust with a decode table: runs anywhere, at a fraction of the vector paths' speed.
    Portable,
    /// x86_64 with AVX2, FMA and F16C (Haswell and later).
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512F and BW (Skylake-SP, Ice Lake, Zen 4 and later): twice the
    /// width for the matrix-vector and matrix products.
    Avx512,
    /// [`Isa::Avx512`] plus AVX-512 VBMI and BF16 (Zen 4, Sapphire Rapids and later): the
    /// matrix-vector product looks weights up as bf16 and multiplies them with `vdpbf16ps`,
    /// against `x` split into two bf16 parts (within `2^-18 Σ|w·x|` of the f32 kernels).
    Avx512Bf16,
    /// aarch64 Advanced SIMD (every ARMv8-A core).
    Neon,
}

impl Isa {
    /// Every implementation this build knows, available on this CPU or not.
    pub const ALL: [Isa; 6] = [
        Isa::Scalar,
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Neon,
    ];

    /// Whether this CPU (and this build's target) can run the implementation.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            Isa::Avx2 => avx2_available(),
            Isa::Avx512 => avx2_available() && avx512_available(),
            Isa::Avx512Bf16 => avx2_available() && avx512_available() && avx512bf16_available(),
            Isa::Neon => cfg!(target_arch = "aarch64"),
        }
    }

    /// The fastest implementation this CPU can run.
    pub fn best() -> Isa {
        if Isa::Avx512Bf16.is_available() {
            Isa::Avx512Bf16
        } else if Isa::Avx512.is_available() {
            Isa::Avx512
        } else if Isa::Avx2.is_available() {
            Isa::Avx2
        } else if Isa::Neon.is_available() {
            Isa::Neon
        } else {
            Isa::Portable
        }
    }

    /// Whether a prompt's matrix product (more than `parallel::SMALL_BATCH` tokens) computes
    /// what the f32 kernels compute, up to summation order: false where it rounds its inputs
    /// and weights to bf16 pairs for speed ([`Isa::Avx512Bf16`]), which tests comparing logits
    /// with another engine must allow for.
    pub fn exact_prompts(self) -> bool {
        !matches!(self.backend(), Ok(Some(backend)) if backend.pairs.is_some())
    }

    /// The vector backend, or `None` for the reference (which bypasses the shared drivers so that
    /// it checks them too).
    fn backend(self) -> Result<Option<&'static Backend>, KernelError> {
        if !self.is_available() {
            return Err(KernelError::IsaUnavailable(self));
        }
        Ok(match self {
            Isa::Scalar => None,
            Isa::Portable => Some(&portable::BACKEND),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&avx2::BACKEND),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(&avx512::BACKEND),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Some(&avx512bf16::BACKEND),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(&neon::BACKEND),
            _ => return Err(KernelError::IsaUnavailable(self)),
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512bf16_available() -> bool {
    is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512bf16_available() -> bool {
    false
}

/// The implementations this CPU can run, the reference first and the fastest last.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| isa.is_available())
        .collect()
}

impl Fp8Matrix<'_> {
    /// `y = W · x`: one output per row (`x.len() == cols`, `y.len() == rows`). The decode step.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        self.matvec_with(Isa::best(), x, y)
    }

    /// [`Self::matvec`] with a chosen implementation.
    pub fn matvec_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        Self::check_operand("matvec input", x.len(), self.cols())?;
        Self::check_operand("matvec output", y.len(), self.rows())?;
        match isa.backend()? {
            None => scalar::matvec(self, x, y),
            Some(backend) => parallel::matvec(backend, self, x, y),
        }
        Ok(())
    }

    /// `ys[i] = matrices[i] · x` for matrices that read the same input (a layer's q, k and v,
    /// or its gate and up): one parallel dispatch over all their rows, so that the pool wakes
    /// once and each thread reads one long run of weights instead of a slice of each matrix.
    pub fn matvec_many(
        matrices: &[Fp8Matrix],
        x: &[f32],
        ys: &mut [&mut [f32]],
    ) -> Result<(), KernelError> {
        Self::matvec_many_with(Isa::best(), matrices, x, ys)
    }

    /// [`Self::matvec_many`] with a chosen implementation.
    pub fn matvec_many_with(
        isa: Isa,
        matrices: &[Fp8Matrix],
        x: &[f32],
        ys: &mut [&mut [f32]],
    ) -> Result<(), KernelError> {
        Self::check_operand("matvec_many outputs", ys.len(), matrices.len())?;
        for (w, y) in matrices.iter().zip(ys.iter()) {
            Self::check_operand("matvec input", x.len(), w.cols())?;
            Self::check_operand("matvec output", y.len(), w.rows())?;
        }
        match isa.backend()? {
            None => matrices
                .iter()
                .zip(ys.iter_mut())
                .for_each(|(w, y)| scalar::matvec(w, x, y)),
            Some(backend) => parallel::matvec_many(backend, matrices, x, ys),
        }
        Ok(())
    }

    /// `Y = X · Wᵀ` for `X` of `[m, cols]` and `Y` of `[m, rows]`, both row-major: the prompt
    /// step, `m` tokens at once. `m` is `x.len() / cols`.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Isa::best(), x, y)
    }

    /// [`Self::matmul`] with a chosen implementation.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        let m = x.len() / self.cols();
        Self::check_operand("matmul input", x.len(), m * self.cols())?;
        Self::check_operand("matmul output", y.len(), m * self.rows())?;
        match isa.backend()? {
            None => scalar::matmul(self, x, m, y),
            Some(backend) if m == 1 => parallel::matvec(backend, self, x, y),
            Some(backend) if m <= parallel::SMALL_BATCH => {
                parallel::matmul_small(backend, self, x, m, y)
            }
            Some(backend) => parallel::matmul(backend, self, x, m, y),
        }
        Ok(())
    }

    /// Dequantizes the listed rows into `out` (`[rows.len(), cols]`): the embedding lookup.
    pub fn gather_rows(&self, rows: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        self.gather_rows_with(Isa::best(), rows, out)
    }

    /// [`Self::gather_rows`] with a chosen implementation.
    pub fn gather_rows_with(
        &self,
        isa: Isa,
        rows: &[usize],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        Self::check_operand("gathered rows", out.len(), rows.len() * self.cols())?;
        if let Some(&row) = rows.iter().find(|&&row| row >= self.rows()) {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows(),
            });
        }
        match isa.backend()? {
            None => scalar::gather_rows(self, rows, out),
            Some(backend) => parallel::gather_rows(backend, self, rows, out),
        }
        Ok(())
    }
}
