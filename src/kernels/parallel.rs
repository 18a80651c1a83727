//! Threading and cache blocking shared by every vector implementation. An implementation supplies
//! four small kernels (a [`Backend`]); the drivers here decide which rows each thread takes and how
//! weights are staged through the caches.

use super::Fp8Matrix;
use super::pool;
use super::prefetch::{LINE, prefetch, prefetch_l2};

/// The most rows of `X` (tokens) any implementation puts in one register tile.
pub(crate) const MAX_MR: usize = 24;
/// Rows of `W` (output channels) in one register tile: the width of a packed panel.
pub(crate) const NR: usize = 16;
/// Reduction length of a packed panel: its `NR × KC` f32 (32 KiB) stay in L1 while every token
/// passes over them. Longer panels also mean fewer passes adding partial sums into `y`, whose
/// rows of a prompt chunk are far larger than L2: 256 spent a sixth of a prefill there.
pub(super) const KC: usize = 512;
/// Tokens per pass over a panel, so that their packed `[MC, KC]` slice of `X` stays in L2.
/// A multiple of every implementation's tile height.
const MC: usize = 240;
/// Below this many weight bytes a matrix-vector product is done on the calling thread: waking
/// the pool would cost more than it saves.
const PARALLEL_MIN_BYTES: usize = 1 << 16;
/// Row chunks per thread in a matrix-vector product: more than one lets a thread whose core is
/// busy with something else hand work over, few enough that each is a long sequential read.
const CHUNKS_PER_THREAD: usize = 2;
/// Row chunks are rounded to this, keeping chunk boundaries off shared cache lines of `y`.
const ROW_ALIGN: usize = 16;

/// The per-instruction-set kernels. Every function requires the CPU features of its instruction
/// set; a `Backend` is only handed out (by `Isa::backend`) when they are present. Each function
/// checks its slice lengths itself.
pub(crate) struct Backend {
    /// Rows of `X` (tokens) in one register tile of [`Self::tile`], at most [`MAX_MR`]: as many
    /// as the instruction set has registers to accumulate.
    pub mr: usize,
    /// `y[i] = W[first_row + i] · x`.
    pub matvec_rows: unsafe fn(w: &Fp8Matrix, first_row: usize, x: &[f32], y: &mut [f32]),
    /// `y[t * rows + i] = W[first_row + i] · x_t` for the `m` tokens of `x` (`[m, cols]`) and
    /// `rows = y.len() / m`: the small-batch product, which widens each weight once for all the
    /// tokens instead of packing panels (see [`SMALL_BATCH`]).
    pub matmul_rows: unsafe fn(w: &Fp8Matrix, first_row: usize, x: &[f32], m: usize, y: &mut [f32]),
    /// Writes `panel[k * NR + j] = W[first_row + j, first_col + k]` (scaled) for `k <
    /// panel.len() / NR`, and zeros for `j >= rows`.
    pub pack_panel: unsafe fn(
        w: &Fp8Matrix,
        first_row: usize,
        rows: usize,
        first_col: usize,
        panel: &mut [f32],
    ),
    /// `tile[i][j] = Σ_k x[k * mr + i] · panel[k * NR + j]` over the panel's length, for `i <
    /// mr`: `x` holds `mr` tokens' inputs interleaved (see [`pack_inputs`]), so that every
    /// broadcast of an input comes from one pointer at a fixed offset.
    pub tile: unsafe fn(panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]),
    /// `out[k] = W[row, k]` (scaled).
    pub dequantize_row: unsafe fn(w: &Fp8Matrix, row: usize, out: &mut [f32]),
    /// Panels of bf16 pairs, which the matrix product takes instead of [`Self::pack_panel`]
    /// and [`Self::tile`] when present.
    pub pairs: Option<PairPanels>,
}

/// A matrix product over bf16 pairs instead of f32: a panel holds, for each pair of columns
/// `(2p, 2p + 1)` and each of its `NR` rows, the two scaled weights rounded to bf16 in one
/// `u32` (the first in the low half); the inputs likewise, `mr` tokens per pair (see
/// [`pack_input_pairs`]). An instruction such as `vdpbf16ps` then does two multiply-adds per
/// lane where an f32 FMA does one. Rounding the inputs and the scaled weights to bf16 changes
/// the arithmetic (each by at most `2^-9` relative); `marengod perplexity` measures what that
/// does to the model (see `Isa::Avx512Bf16`).
pub(crate) struct PairPanels {
    /// Tokens in one register tile of [`Self::tile`], at most [`MAX_MR`].
    pub mr: usize,
    /// Writes the pairs of `W[first_row + j, first_col + 2p..]` for `p < panel.len() / NR`,
    /// zeros past `rows` and past the matrix's last column.
    pub pack_panel: unsafe fn(
        w: &Fp8Matrix,
        first_row: usize,
        rows: usize,
        first_col: usize,
        panel: &mut [u32],
    ),
    /// `tile[i][j] = Σ_p x[p * mr + i] · panel[p * NR + j]` over the panel's pairs, for `i < mr`.
    pub tile: unsafe fn(panel: &[u32], x: &[u32], tile: &mut [[f32; NR]]),
}

pub(super) fn matvec(backend: &Backend, w: &Fp8Matrix, x: &[f32], y: &mut [f32]) {
    let threads = pool::threads();
    if threads == 1 || w.rows() * w.cols() < PARALLEL_MIN_BYTES {
        // SAFETY: the backend's CPU features are present (see `Backend`).
        unsafe { (backend.matvec_rows)(w, 0, x, y) };
        return;
    }
    let chunk = w
        .rows()
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .next_multiple_of(ROW_ALIGN);
    pool::for_each_chunk_mut(y, chunk, |index, y| {
        // SAFETY: as above.
        unsafe { (backend.matvec_rows)(w, index * chunk, x, y) };
    });
}

/// [`matvec`] over several matrices that read the same `x`, as one dispatch: the rows of all of
/// them are cut into chunks of one size, a chunk never straddling two matrices.
pub(super) fn matvec_many(backend: &Backend, ws: &[Fp8Matrix], x: &[f32], ys: &mut [&mut [f32]]) {
    let threads = pool::threads();
    let bytes: usize = ws.iter().map(|w| w.rows() * w.cols()).sum();
    if threads == 1 || bytes < PARALLEL_MIN_BYTES {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            // SAFETY: the backend's CPU features are present (see `Backend`).
            unsafe { (backend.matvec_rows)(w, 0, x, y) };
        }
        return;
    }
    let rows: usize = ws.iter().map(Fp8Matrix::rows).sum();
    let chunk = rows
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .next_multiple_of(ROW_ALIGN);
    let mut chunks: Vec<(&Fp8Matrix, usize, &mut [f32])> = ws
        .iter()
        .zip(ys.iter_mut())
        .flat_map(|(w, y)| {
            y.chunks_mut(chunk)
                .enumerate()
                .map(move |(index, y)| (w, index * chunk, y))
        })
        .collect();
    pool::for_each_chunk_mut(&mut chunks, 1, |_, chunk| {
        for (w, first_row, y) in chunk {
            // SAFETY: as above.
            unsafe { (backend.matvec_rows)(w, *first_row, x, y) };
        }
    });
}

/// The most tokens for which a matrix product takes [`Backend::matmul_rows`] rather than packed
/// panels. Panels cost a fixed share per weight (widening, transposing, storing and reloading
/// it) and fill tiles of up to 24 tokens whatever the count, so for a few tokens they cost
/// about what 24 do; the small-batch kernel's cost grows with the tokens from the weight
/// stream's. Measured with `examples/kernels_bench` on a 5632×2048 matrix (TinyLlama's MLP),
/// 2 threads, AVX-512 (Zen 4), on a loaded shared machine, GFLOP/s of panels / small batch:
/// m = 2: 5.8 / 12.8, 5: 11.3 / 13.8, 8: 17.3 / 20.5, 12: 26.6 / 22.8 and 7.0 / 14.6 back to
/// back, 16: 24.7 / 15.2 and 9.8 / 14.2. The crossover lies between 12 and 16 tokens.
pub(crate) const SMALL_BATCH: usize = 12;

pub(super) fn matmul_small(backend: &Backend, w: &Fp8Matrix, x: &[f32], m: usize, y: &mut [f32]) {
    let threads = pool::threads();
    let n = w.rows();
    if threads == 1 || n * w.cols() < PARALLEL_MIN_BYTES {
        // `y` is `[m, n]`, the layout of one chunk holding every row.
        // SAFETY: the backend's CPU features are present (see `Backend`).
        unsafe { (backend.matmul_rows)(w, 0, x, m, y) };
        return;
    }
    let chunk = n
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .next_multiple_of(ROW_ALIGN);
    let output = SharedOutput {
        start: y.as_mut_ptr(),
        len: y.len(),
    };
    pool::run(n.div_ceil(chunk), |index| {
        // The whole of `output` is captured, not its (unshareable) pointer field alone.
        let output = &output;
        let rows = index * chunk..((index + 1) * chunk).min(n);
        // A chunk's outputs are `[m, rows]`; copied into the columns `rows` of `y` after.
        let mut part = vec![0.0; m * rows.len()];
        // SAFETY: as above.
        unsafe { (backend.matmul_rows)(w, rows.start, x, m, &mut part) };
        for (token, part) in part.chunks_exact(rows.len()).enumerate() {
            let start = token * n + rows.start;
            assert!(start + rows.len() <= output.len);
            // SAFETY: in bounds (checked above); the columns `rows` belong to this chunk alone,
            // so no other thread refers to them.
            let y = unsafe { std::slice::from_raw_parts_mut(output.start.add(start), rows.len()) };
            y.copy_from_slice(part);
        }
    });
}

pub(super) fn gather_rows(backend: &Backend, w: &Fp8Matrix, rows: &[usize], out: &mut [f32]) {
    for (&row, out) in rows.iter().zip(out.chunks_exact_mut(w.cols())) {
        // SAFETY: the backend's CPU features are present (see `Backend`).
        unsafe { (backend.dequantize_row)(w, row, out) };
    }
}

/// `y`, shared between threads that each write a disjoint set of its columns.
#[derive(Clone, Copy)]
struct SharedOutput {
    start: *mut f32,
    len: usize,
}

// SAFETY: threads only ever form references to disjoint parts of the buffer (see `matmul` and
// `matmul_small`).
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

pub(super) fn matmul(backend: &Backend, w: &Fp8Matrix, x: &[f32], m: usize, y: &mut [f32]) {
    match &backend.pairs {
        Some(pairs) => matmul_with(pairs, w, x, m, y),
        None => matmul_with(backend, w, x, m, y),
    }
}

/// The operands of a register tile, as the matrix product packs them: f32 ([`Backend`]) or
/// bf16 pairs ([`PairPanels`]).
trait Panels: Sync {
    type Element: Copy + Default + Send;
    fn mr(&self) -> usize;
    /// Panel elements along the reduction for `depth` columns.
    fn elements(&self, depth: usize) -> usize;
    fn pack_inputs(
        &self,
        x: &[f32],
        k: usize,
        tokens: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        packed: &mut [Self::Element],
    );
    /// # Safety
    /// The CPU features of the implementation must be present.
    unsafe fn pack_panel(
        &self,
        w: &Fp8Matrix,
        first_row: usize,
        rows: usize,
        first_col: usize,
        panel: &mut [Self::Element],
    );
    /// # Safety
    /// As [`Self::pack_panel`].
    unsafe fn tile(&self, panel: &[Self::Element], x: &[Self::Element], tile: &mut [[f32; NR]]);
}

impl Panels for Backend {
    type Element = f32;
    fn mr(&self) -> usize {
        self.mr
    }
    fn elements(&self, depth: usize) -> usize {
        depth
    }
    fn pack_inputs(
        &self,
        x: &[f32],
        k: usize,
        tokens: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        packed: &mut [f32],
    ) {
        pack_inputs(x, k, tokens, cols, self.mr, packed);
    }
    unsafe fn pack_panel(
        &self,
        w: &Fp8Matrix,
        first_row: usize,
        rows: usize,
        first_col: usize,
        panel: &mut [f32],
    ) {
        // SAFETY: the caller's.
        unsafe { (self.pack_panel)(w, first_row, rows, first_col, panel) }
    }
    unsafe fn tile(&self, panel: &[f32], x: &[f32], tile: &mut [[f32; NR]]) {
        // SAFETY: the caller's.
        unsafe { (self.tile)(panel, x, tile) }
    }
}

impl Panels for PairPanels {
    type Element = u32;
    fn mr(&self) -> usize {
        self.mr
    }
    fn elements(&self, depth: usize) -> usize {
        depth.div_ceil(2)
    }
    fn pack_inputs(
        &self,
        x: &[f32],
        k: usize,
        tokens: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        packed: &mut [u32],
    ) {
        pack_input_pairs(x, k, tokens, cols, self.mr, packed);
    }
    unsafe fn pack_panel(
        &self,
        w: &Fp8Matrix,
        first_row: usize,
        rows: usize,
        first_col: usize,
        panel: &mut [u32],
    ) {
        // SAFETY: the caller's.
        unsafe { (self.pack_panel)(w, first_row, rows, first_col, panel) }
    }
    unsafe fn tile(&self, panel: &[u32], x: &[u32], tile: &mut [[f32; NR]]) {
        // SAFETY: the caller's.
        unsafe { (self.tile)(panel, x, tile) }
    }
}

fn matmul_with<P: Panels>(panels: &P, w: &Fp8Matrix, x: &[f32], m: usize, y: &mut [f32]) {
    let strips = w.rows().div_ceil(NR);
    let groups = pool::threads().min(strips);
    let output = SharedOutput {
        start: y.as_mut_ptr(),
        len: y.len(),
    };
    let columns = |group: usize| {
        let first = strips * group / groups * NR;
        let end = (strips * (group + 1) / groups * NR).min(w.rows());
        first..end
    };
    if groups == 1 {
        matmul_columns(panels, w, x, m, output, columns(0));
    } else {
        pool::run(groups, |group| {
            matmul_columns(panels, w, x, m, output, columns(group));
        });
    }
}

/// Computes the columns `columns` of every row of `y`; nothing else of `y` is touched.
fn matmul_columns<P: Panels>(
    panels: &P,
    w: &Fp8Matrix,
    x: &[f32],
    m: usize,
    output: SharedOutput,
    columns: std::ops::Range<usize>,
) {
    let (n, k) = (w.rows(), w.cols());
    let mr = panels.mr();
    debug_assert_eq!(output.len, m * n);
    debug_assert!(mr <= MAX_MR && MC.is_multiple_of(mr));
    let mut panel = vec![P::Element::default(); panels.elements(KC) * NR];
    let mut inputs = vec![P::Element::default(); MC * panels.elements(KC)];
    let mut tile = [[0.0; NR]; MAX_MR];
    let tile = &mut tile[..mr];
    for first_token in (0..m).step_by(MC) {
        let tokens = first_token..(first_token + MC).min(m);
        for first_col in (0..k).step_by(KC) {
            let depth = KC.min(k - first_col);
            let elements = panels.elements(depth);
            let panel = &mut panel[..elements * NR];
            panels.pack_inputs(
                x,
                k,
                tokens.clone(),
                first_col..first_col + depth,
                &mut inputs,
            );
            for first_row in columns.clone().step_by(NR) {
                let width = NR.min(columns.end - first_row);
                // SAFETY: the backend's CPU features are present (see `Backend`).
                unsafe { panels.pack_panel(w, first_row, width, first_col, panel) };
                prefetch_panel(w, first_row + NR..columns.end, first_col..first_col + depth);
                let tiles = inputs.chunks_exact(elements * mr);
                for (token, packed) in tokens.clone().step_by(mr).zip(tiles) {
                    let height = mr.min(tokens.end - token);
                    // The rows of `y` this tile adds to were last touched a whole sweep of
                    // `y` ago: ask for them while the tile is computed.
                    for i in 0..height {
                        prefetch(
                            output
                                .start
                                .wrapping_add((token + i) * n + first_row)
                                .cast(),
                        );
                    }
                    // SAFETY: as above.
                    unsafe { panels.tile(panel, packed, tile) };
                    for (i, tile_row) in tile.iter().take(height).enumerate() {
                        let start = (token + i) * n + first_row;
                        assert!(start + width <= output.len);
                        // SAFETY: in bounds (checked above); the columns `first_row..+width`
                        // belong to this call alone, so no other thread refers to them.
                        let y = unsafe {
                            std::slice::from_raw_parts_mut(output.start.add(start), width)
                        };
                        store(y, tile_row, first_col == 0);
                    }
                }
            }
        }
    }
}

/// Asks for the weights of the next panel (`rows` from the first, `cols`) while the tiles of
/// this one are computed. A panel's 16 rows lie in 16 different pages, which the hardware
/// prefetchers do not follow, so without this every panel would start with cache misses and
/// the cores would wait for memory with nothing to compute.
fn prefetch_panel(w: &Fp8Matrix, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
    for row in rows.take(NR) {
        let bytes = &w.row_bytes(row)[cols.clone()];
        for offset in (0..bytes.len()).step_by(LINE) {
            prefetch_l2(bytes[offset..].as_ptr());
        }
    }
}

/// Writes (`first`) or adds a tile row to its place in `y`. A whole row is a fixed-size
/// array so that the compiler makes one vector operation of it.
#[inline]
fn store(y: &mut [f32], tile_row: &[f32; NR], first: bool) {
    match <&mut [f32; NR]>::try_from(&mut *y) {
        Ok(y) if first => *y = *tile_row,
        Ok(y) => (0..NR).for_each(|j| y[j] += tile_row[j]),
        Err(_) if first => y.copy_from_slice(&tile_row[..y.len()]),
        Err(_) => y.iter_mut().zip(tile_row).for_each(|(y, t)| *y += t),
    }
}

/// Copies `X[tokens, cols]` (`X` row-major with `k` columns) into `packed` as consecutive
/// tiles of `mr` tokens, each `[cols.len()][mr]` (a token's inputs `mr` apart). Tokens past the
/// end of the last tile are zeros; their results are never stored.
fn pack_inputs(
    x: &[f32],
    k: usize,
    tokens: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    mr: usize,
    packed: &mut [f32],
) {
    let depth = cols.len();
    for (first, tile) in tokens
        .clone()
        .step_by(mr)
        .zip(packed.chunks_exact_mut(depth * mr))
    {
        for i in 0..mr {
            let token = first + i;
            if token < tokens.end {
                let row = &x[token * k + cols.start..token * k + cols.end];
                for (col, &value) in row.iter().enumerate() {
                    tile[col * mr + i] = value;
                }
            } else {
                (0..depth).for_each(|col| tile[col * mr + i] = 0.0);
            }
        }
    }
}

/// [`pack_inputs`] for [`PairPanels`]: each element holds the inputs of two consecutive
/// columns rounded to bf16, the first in the low half; a last odd column is paired with zero.
fn pack_input_pairs(
    x: &[f32],
    k: usize,
    tokens: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    mr: usize,
    packed: &mut [u32],
) {
    let pairs = cols.len().div_ceil(2);
    for (first, tile) in tokens
        .clone()
        .step_by(mr)
        .zip(packed.chunks_exact_mut(pairs * mr))
    {
        for i in 0..mr {
            let token = first + i;
            if token < tokens.end {
                let row = &x[token * k + cols.start..token * k + cols.end];
                for (pair, values) in row.chunks(2).enumerate() {
                    let high = values.get(1).map_or(0, |&v| bf16(v));
                    tile[pair * mr + i] = bf16(values[0]) | high << 16;
                }
            } else {
                (0..pairs).for_each(|pair| tile[pair * mr + i] = 0);
            }
        }
    }
}

/// `value` rounded to the nearest bf16 (ties to even), as the bits of its upper half.
pub(crate) fn bf16(value: f32) -> u32 {
    let bits = value.to_bits();
    if value.is_nan() {
        // Quiet, whatever the payload's low bits.
        return (bits >> 16) | 0x40;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}
