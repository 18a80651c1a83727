//! marengo's own tract ops for FP8 weights that stay in the mapped bundle file.
//!
//! tract has no FP8 datum type and copies ONNX external data into heap buffers; a 7B model
//! would need 7 GB of heap in FP8, 29 GB widened to f32. These ops instead hold a
//! [`MappedFp8`] — an `Arc` of the file mapping plus byte ranges — and hand the mapped bytes
//! straight to [`crate::kernels`], which dequantizes inside the product. The weights live
//! in the page cache: shared, evictable, never anonymous memory of the daemon.
//!
//! Each op exists twice: as an [`Expansion`] that tract-onnx's parser places (inference
//! stage, attached to its weights after parsing), and as the [`TypedOp`] it wires into the
//! typed model, which is what runs.

use std::ops::Range;
use std::sync::Arc;

use marengo_bundle::manifest::WEIGHTS_FILE;
use memmap2::Mmap;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::Fp8Matrix;

/// An FP8 E4M3FN matrix `[rows, cols]` and its f32 scales, as byte ranges of the mapped
/// `model.weights`.
#[derive(Clone)]
pub struct MappedFp8 {
    pub name: String,
    map: Arc<Mmap>,
    codes: Range<usize>,
    scales: Range<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Elements along `cols` that share one scale; `None` is one scale per row.
    pub block: Option<usize>,
}

impl std::fmt::Debug for MappedFp8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} fp8[{}, {}]", self.name, self.rows, self.cols)?;
        if let Some(b) = self.block {
            write!(f, " block {b}")?;
        }
        Ok(())
    }
}

impl PartialEq for MappedFp8 {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.map, &other.map) && self.codes == other.codes
    }
}

impl Eq for MappedFp8 {}

impl MappedFp8 {
    /// Checks that the ranges lie inside the mapping and agree with the shape, so that the
    /// kernels can trust them.
    pub fn new(
        name: &str,
        map: Arc<Mmap>,
        codes: Range<usize>,
        scales: Range<usize>,
        rows: usize,
        cols: usize,
        block: Option<usize>,
    ) -> TractResult<MappedFp8> {
        let scale_count = match block {
            None => rows,
            Some(b) => {
                ensure!(
                    b > 0 && cols.is_multiple_of(b),
                    "{name}: block {b} does not divide {cols}"
                );
                rows * (cols / b)
            }
        };
        ensure!(
            codes.len() == rows * cols,
            "{name}: {} bytes of FP8 codes for a [{rows}, {cols}] matrix",
            codes.len()
        );
        ensure!(
            scales.len() == scale_count * 4,
            "{name}: {} bytes of scales, expected {scale_count} f32",
            scales.len()
        );
        ensure!(
            codes.end <= map.len() && scales.end <= map.len(),
            "{name}: tensor data beyond the end of {WEIGHTS_FILE}"
        );
        ensure!(
            scales.start.is_multiple_of(4),
            "{name}: scales are not 4-byte aligned"
        );
        let weight = MappedFp8 {
            name: name.to_string(),
            map,
            codes,
            scales,
            rows,
            cols,
            block,
        };
        weight.matrix()?;
        Ok(weight)
    }

    pub fn matrix(&self) -> TractResult<Fp8Matrix<'_>> {
        let scales: &[f32] = bytemuck::try_cast_slice(&self.map[self.scales.clone()])
            .map_err(|e| format_err!("{}: scales: {e:?}", self.name))?;
        let matrix = Fp8Matrix::new(
            &self.map[self.codes.clone()],
            self.rows,
            self.cols,
            scales,
            self.block,
        )
        .map_err(|e| format_err!("{}: {e}", self.name))?;
        Ok(matrix)
    }
}

/// `y_i = x · W_iᵀ` for f32 `x[.., cols]`, giving one output `y_i[.., rows_i]` per weight.
/// The weights share the input (a layer's q, k and v; its gate and up; the head and its
/// residual), so a decode step runs them as one [`Fp8Matrix::matvec_many`]: one dispatch of
/// the pool instead of one per matrix. A prompt chunk runs one matrix product per weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Linear {
    pub weights: TVec<MappedFp8>,
}

impl Op for Fp8Linear {
    fn name(&self) -> StaticName {
        "Fp8Linear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(self.weights.iter().map(|w| format!("{w:?}")).collect())
    }

    op_as_typed_op!();
}

impl Fp8Linear {
    fn cols(&self) -> TractResult<usize> {
        let cols = self
            .weights
            .first()
            .context("Fp8Linear without weights")?
            .cols;
        ensure!(
            self.weights.iter().all(|w| w.cols == cols),
            "Fp8Linear over weights of different widths: {:?}",
            self.weights
        );
        Ok(cols)
    }
}

impl EvalOp for Fp8Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let x = x.cast_to::<f32>()?;
        let shape = x.shape();
        let k = *shape.last().context("Fp8Linear on a scalar")?;
        ensure!(
            k == self.cols()?,
            "{:?}: input has {k} features",
            self.weights
        );
        let m = shape[..shape.len() - 1].iter().product::<usize>();
        let mut outputs = self
            .weights
            .iter()
            .map(|w| {
                let mut out_shape: TVec<usize> = shape.into();
                *out_shape.last_mut().context("rank")? = w.rows;
                Ok(unsafe { Tensor::uninitialized::<f32>(&out_shape)? })
            })
            .collect::<TractResult<TVec<Tensor>>>()?;
        let matrices = self
            .weights
            .iter()
            .map(MappedFp8::matrix)
            .collect::<TractResult<TVec<_>>>()?;
        {
            let xview = x.try_as_plain_ram()?;
            let xs = xview.as_slice::<f32>()?;
            let mut views = outputs
                .iter_mut()
                .map(Tensor::try_as_plain_ram_mut)
                .collect::<TractResult<TVec<_>>>()?;
            let mut ys = views
                .iter_mut()
                .map(|v| v.as_slice_mut::<f32>())
                .collect::<TractResult<TVec<_>>>()?;
            if m == 1 {
                Fp8Matrix::matvec_many(&matrices, xs, &mut ys)
                    .map_err(|e| format_err!("{:?}: {e}", self.weights))?;
            } else {
                for ((matrix, y), weight) in matrices.iter().zip(ys.iter_mut()).zip(&self.weights) {
                    matrix
                        .matmul(xs, y)
                        .map_err(|e| format_err!("{}: {e}", weight.name))?;
                }
            }
        }
        Ok(outputs.into_iter().map(Tensor::into_tvalue).collect())
    }
}

impl TypedOp for Fp8Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.weights
            .iter()
            .map(|w| {
                let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
                let last = shape.last_mut().context("Fp8Linear on a scalar")?;
                *last = w.rows.to_dim();
                Ok(f32::fact(shape))
            })
            .collect()
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let m: TDim = inputs[0].shape.iter().rev().skip(1).product();
        let weights: usize = self.weights.iter().map(|w| w.rows * w.cols).sum();
        Ok(tvec!((Cost::FMA(f32::datum_type()), m * weights)))
    }

    as_op!();
}

/// The embedding lookup: rows of an FP8 table for integer ids `[..]`, giving `[.., cols]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Gather {
    pub table: MappedFp8,
}

impl Op for Fp8Gather {
    fn name(&self) -> StaticName {
        "Fp8Gather".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.table)])
    }

    op_as_typed_op!();
}

impl EvalOp for Fp8Gather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = args_1!(inputs);
        let ids = ids.cast_to::<i64>()?;
        let rows = ids
            .try_as_plain_ram()?
            .as_slice::<i64>()?
            .iter()
            .map(|&id| {
                usize::try_from(id)
                    .ok()
                    .filter(|&r| r < self.table.rows)
                    .with_context(|| {
                        format!(
                            "token id {id} outside the vocabulary of {}",
                            self.table.rows
                        )
                    })
            })
            .collect::<TractResult<Vec<usize>>>()?;
        let mut out_shape: TVec<usize> = ids.shape().into();
        out_shape.push(self.table.cols);
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        self.table
            .matrix()?
            .gather_rows(&rows, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?)
            .map_err(|e| format_err!("{}: {e}", self.table.name))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Fp8Gather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.table.cols.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// The parse-time stand-in for [`Fp8Linear`] or [`Fp8Gather`]: tract-onnx's op builders
/// are plain functions and cannot capture the mapping, so the parser places this node
/// with the weights' names and shapes, and the loader attaches the mapped weights before the
/// model is typed.
#[derive(Clone, Debug)]
pub struct Fp8Node {
    pub kind: Fp8NodeKind,
    /// One per output; only a linear node has several (see [`Fp8Linear`]).
    pub weight_names: Vec<String>,
    pub rows: Vec<usize>,
    pub cols: usize,
    /// Attached by the loader, in the order of `weight_names`.
    pub weights: Vec<MappedFp8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8NodeKind {
    Linear,
    Gather,
}

impl Expansion for Fp8Node {
    fn name(&self) -> StaticName {
        match self.kind {
            Fp8NodeKind::Linear => "Fp8Linear".into(),
            Fp8NodeKind::Gather => "Fp8Gather".into(),
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.weight_names.len())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, self.weight_names.len())?;
        match self.kind {
            Fp8NodeKind::Linear => {
                for (output, &rows) in outputs.iter().zip(&self.rows) {
                    s.equals(&output.datum_type, f32::datum_type())?;
                    s.equals(&inputs[0].rank, &output.rank)?;
                    let rows = rows.to_dim();
                    s.given(&inputs[0].rank, move |s, rank| {
                        let rank = rank as usize;
                        for ax in 0..rank - 1 {
                            s.equals(&inputs[0].shape[ax], &output.shape[ax])?;
                        }
                        s.equals(&output.shape[rank - 1], rows.clone())
                    })?;
                }
                Ok(())
            }
            Fp8NodeKind::Gather => {
                check_output_arity(outputs, 1)?;
                s.equals(&outputs[0].datum_type, f32::datum_type())?;
                let cols = self.cols.to_dim();
                s.given(&inputs[0].rank, move |s, rank| {
                    s.equals(&outputs[0].rank, rank + 1)?;
                    let rank = rank as usize;
                    for ax in 0..rank {
                        s.equals(&inputs[0].shape[ax], &outputs[0].shape[ax])?;
                    }
                    s.equals(&outputs[0].shape[rank], cols.clone())
                })
            }
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        ensure!(
            self.weights.len() == self.weight_names.len(),
            "{prefix}: FP8 weights {:?} were never attached",
            self.weight_names
        );
        match (self.kind, &self.weights[..]) {
            (Fp8NodeKind::Linear, weights) => {
                let weights = weights.iter().cloned().collect();
                model.wire_node(prefix, Fp8Linear { weights }, inputs)
            }
            (Fp8NodeKind::Gather, [table]) => model.wire_node(
                prefix,
                Fp8Gather {
                    table: table.clone(),
                },
                inputs,
            ),
            (Fp8NodeKind::Gather, _) => bail!("{prefix}: an FP8 lookup reads one table"),
        }
    }
}
