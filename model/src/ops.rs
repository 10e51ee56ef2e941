//! Small tensor helpers shared by the model parts.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Result, Tensor};

/// Set by [`use_portable_paths`].
static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Whether the hand-written CPU kernels serve tensors on `device` (the linear
/// products of `crate::linear`, the one-query attention, the blocked SigLIP
/// attention, the fused GELU and expert passes). Elsewhere, and on a GPU, the same
/// values come from candle's tensor operations alone: the path a GPU runs.
pub fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !PORTABLE.load(Ordering::Relaxed)
}

/// Runs the whole model through the tensor-operation path a GPU takes, on the CPU
/// too (for the whole process, from now on): how the GPU's code path is checked
/// against the golden fixtures on a machine without one. The CPU's own kernels are
/// faster; nothing else should turn this on.
pub fn use_portable_paths(on: bool) {
    PORTABLE.store(on, Ordering::Relaxed);
}

/// `a · b` (candle's batched matrix product) with both operands in a layout cuBLAS
/// takes. candle's CUDA product accepts an operand only when its two inner dimensions
/// are packed (rows exactly as long as they are wide, in either order) and its batch
/// dimensions form one evenly strided run; its CPU product takes any strides. An
/// operand outside those layouts (a transposed view of a head-split tensor, say) is
/// copied first, on every device, so the CPU's tensor-operation path makes the same
/// copies as a GPU's and the model's products never meet a layout the GPU refuses.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    gemm_layout(a)?.matmul(&gemm_layout(b)?)
}

/// `t` itself when cuBLAS can read it in place (see [`matmul`]), else a contiguous copy.
fn gemm_layout(t: &Tensor) -> Result<Tensor> {
    let (dims, stride) = (t.dims(), t.stride());
    let r = dims.len();
    if r < 2 {
        return Ok(t.clone());
    }
    let (rows, cols) = (dims[r - 2], dims[r - 1]);
    let (rs, cs) = (stride[r - 2], stride[r - 1]);
    let row_major = (cs == 1 || cols == 1) && (rs == cols || rows == 1);
    let col_major = (cs == rows || cols == 1) && (rs == 1 || rows == 1);
    let batch = match r {
        2 | 3 => true,
        4 => dims[0] == 1 || dims[1] == 1 || stride[0] == stride[1] * dims[1],
        _ => false,
    };
    if (row_major || col_major) && batch {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// LayerNorm over the last dimension with biased variance, computed in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Root-mean-square norm as the reference computes it: the normalisation in f32, cast
/// back to the input dtype *before* multiplying by the weight (`DeepseekV2RMSNorm`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension computed in f32, returned in `x`'s dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Indices of the `k` largest values of `values`, largest first. NaN sorts lowest; ties
/// keep the lower index first.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| {
        let v = values[i];
        if v.is_nan() { f32::NEG_INFINITY } else { v }
    };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// In-place softmax of a row of f32 values.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// `tanh(x)` by the rational approximation of Eigen's `generic_fast_tanh_float`
/// (odd degree-13 numerator over even degree-6 denominator on `x` clamped to ±7.9053;
/// within a few ulp of `tanhf`), written so that a loop over it vectorises.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_672e-11,
        2.000_188e-13,
        -2.760_768_5e-16,
    ];
    const B: [f32; 4] = [
        4.893_525_2e-3,
        2.268_434_6e-3,
        1.185_347_1e-4,
        1.198_258_4e-6,
    ];
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = A[6];
    for a in A[..6].iter().rev() {
        p = p * x2 + a;
    }
    let q = ((B[3] * x2 + B[2]) * x2 + B[1]) * x2 + B[0];
    x * p / q
}

/// The tanh-approximate GELU (`gelu_pytorch_tanh`, candle's `Tensor::gelu`):
/// `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`, with [`fast_tanh`] on f32 CPU tensors
/// (the scalar `tanhf` of candle's version is most of its time).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    if x.dtype() != DType::F32 || !cpu_kernels(x.device()) {
        return x.gelu();
    }
    let x = x.contiguous()?;
    let mut out = with_f32_slice(&x, |v| v.to_vec())?;
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    out.par_chunks_mut(1 << 14).for_each(|chunk| {
        for v in chunk {
            let x = *v;
            *v = 0.5 * x * (1.0 + fast_tanh(k * x * (1.0 + 0.044715 * x * x)));
        }
    });
    Tensor::from_vec(out, x.dims(), x.device())
}

/// In-place logistic sigmoid of a row of f32 values.
pub fn sigmoid_in_place(row: &mut [f32]) {
    for v in row.iter_mut() {
        *v = 1.0 / (1.0 + (-*v).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn products_copy_only_what_cublas_cannot_read_in_place() -> Result<()> {
        let x = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        // A transposed packed matrix is read in place (as cuBLAS's transposed operand).
        let t = x.t()?;
        assert!(!t.is_contiguous());
        assert!(!gemm_layout(&t)?.is_contiguous(), "used in place");
        // Keys split into heads, then transposed: rows 4 apart but 2 wide, copied.
        let keys = Tensor::arange(0f32, 24., &Device::Cpu)?
            .reshape((3, 2, 4))? // (s, heads, head_dim)
            .transpose(0, 1)?; // (heads, s, head_dim), rows 8 apart
        assert!(gemm_layout(&keys)?.is_contiguous());
        assert!(gemm_layout(&keys.t()?)?.is_contiguous());
        // The product is the same either way.
        let q = Tensor::ones((2, 1, 4), DType::F32, &Device::Cpu)?;
        let want = q.matmul(&keys.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let got = matmul(&q, &keys.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn fast_tanh_is_within_a_few_ulp_of_tanh() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4; // -20 … 20
            let (got, want) = (fast_tanh(x), x.tanh());
            worst = worst.max((got - want).abs());
        }
        assert!(worst < 1e-6, "largest difference {worst}");
        assert_eq!(fast_tanh(0.0), 0.0);
        assert_eq!(fast_tanh(-30.0), -fast_tanh(30.0));
    }

    #[test]
    fn fast_gelu_matches_candle_gelu() -> Result<()> {
        let x = Tensor::arange(-800f32, 800., &Device::Cpu)?.affine(0.01, 0.0)?;
        let diff = (gelu_tanh(&x)? - x.gelu()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max abs difference {diff}");
        Ok(())
    }

    #[test]
    fn top_k_orders_largest_first_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5, f32::NAN], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut row = [1.0f32, 2.0, 3.0];
        softmax_in_place(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[0] < row[1] && row[1] < row[2]);
        let mut big = [1000.0f32, 1000.0];
        softmax_in_place(&mut big);
        assert_eq!(big, [0.5, 0.5]);
    }

    #[test]
    fn rms_norm_matches_the_formula() -> Result<()> {
        let x = Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu)?;
        let w = Tensor::new(&[2.0f32, 0.5], &Device::Cpu)?;
        let y = rms_norm(&x, &w, 0.0)?.to_vec2::<f32>()?;
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 2.0 * 3.0 / rms).abs() < 1e-6);
        assert!((y[0][1] - 0.5 * 4.0 / rms).abs() < 1e-6);
        Ok(())
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor.
pub fn with_f32_slice<T>(a: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    let (sa, la) = a.storage_and_layout();
    let Some((a0, a1)) = la.contiguous_offsets() else {
        candle_core::bail!("with_f32_slice: the tensor is not contiguous");
    };
    let candle_core::Storage::Cpu(ca) = &*sa else {
        candle_core::bail!("with_f32_slice: the tensor is not on the CPU");
    };
    Ok(f(&ca.as_slice::<f32>()?[a0..a1]))
}

/// Runs `f` on the values of two contiguous f32 CPU tensors.
pub fn with_f32_slices<T>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> T,
) -> Result<T> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets())
    else {
        candle_core::bail!("with_f32_slices: a tensor is not contiguous");
    };
    let (candle_core::Storage::Cpu(ca), candle_core::Storage::Cpu(cb)) = (&*sa, &*sb) else {
        candle_core::bail!("with_f32_slices: a tensor is not on the CPU");
    };
    Ok(f(
        &ca.as_slice::<f32>()?[a0..a1],
        &cb.as_slice::<f32>()?[b0..b1],
    ))
}
