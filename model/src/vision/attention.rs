//! SigLIP self-attention on the CPU in f32, one (tile, head) pair per task: the pair's
//! scores (patches × patches, 729² f32 = 2.1 MB for 384×384 tiles) are computed,
//! softmaxed and multiplied with the values while they sit in the core's L2, instead of
//! materialising the scores of every tile and head at once (170 MB for a five-tile
//! image, written and read three times). Queries, keys and values are read in place
//! from the fused `qkv` projection by strides, and each head's output is written
//! straight into its columns of the result, so there are no transposed copies. This is
//! the per-head blocking of FlashAttention's outer loop (Dao et al., 2022) without its
//! online softmax: one head's whole score matrix fits in L2 at these sizes. Products
//! are the `gemm` crate's f32 kernel; the softmax is `ops::softmax_in_place` (the
//! reference's f32 softmax).

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::linear::panels::SendPtr;

/// `qkv` (tiles·patches, 3·width) f32 on the CPU, rows of tile `t` at
/// `t·patches..`, columns [q | k | v] with `heads` heads each → the attention output
/// (tiles·patches, width), heads side by side, as `softmax(q·kᵀ/√d)·v` per tile and head.
pub fn blocked(qkv: &Tensor, tiles: usize, patches: usize, heads: usize) -> Result<Tensor> {
    let (rows, three_c) = qkv.dims2()?;
    let c = three_c / 3;
    if rows != tiles * patches || c * 3 != three_c || heads == 0 || c % heads != 0 {
        candle_core::bail!(
            "attention: qkv ({rows}, {three_c}) is not {tiles} tiles × {patches} patches × 3 × {heads} heads"
        );
    }
    let hd = c / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let qkv = qkv.contiguous()?;
    let mut out = vec![0f32; rows * c];
    let dst = SendPtr(out.as_mut_ptr());
    crate::ops::with_f32_slice(&qkv, |data| {
        (0..tiles * heads).into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, pair| {
                let (t, h) = (pair / heads, pair % heads);
                let tile = &data[t * patches * three_c..(t + 1) * patches * three_c];
                scores.resize(patches * patches, 0.0);
                // SAFETY: q, k and v of head h are the columns h·hd.., c + h·hd.. and
                // 2c + h·hd.. (hd wide) of the tile's `patches` rows of `three_c`, all
                // inside `tile`; the scores are patches × patches in `scores`; the output
                // block (rows t·patches.., columns h·hd.., hd wide, row stride c) lies in
                // `out` and no other task writes it (one task per (tile, head)).
                #[allow(unsafe_code)]
                unsafe {
                    let q = tile.as_ptr().add(h * hd);
                    let k = tile.as_ptr().add(c + h * hd);
                    let v = tile.as_ptr().add(2 * c + h * hd);
                    // scores = scale · q · kᵀ
                    gemm::gemm(
                        patches,
                        patches,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        patches as isize,
                        false,
                        q,
                        1,
                        three_c as isize,
                        k,
                        three_c as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for row in scores.chunks_exact_mut(patches) {
                        crate::ops::softmax_in_place(row);
                    }
                    // out = scores · v
                    gemm::gemm(
                        patches,
                        hd,
                        patches,
                        dst.get().add(t * patches * c + h * hd),
                        1,
                        c as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        patches as isize,
                        v,
                        1,
                        three_c as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
    })?;
    Tensor::from_vec(out, (rows, c), qkv.device())
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor};

    /// Equals softmax(q·kᵀ/√d)·v computed with whole tensors, at odd sizes.
    #[test]
    fn blocked_attention_equals_the_tensor_formula() {
        let (tiles, patches, heads, hd) = (3usize, 13usize, 3usize, 5usize);
        let c = heads * hd;
        let qkv = Tensor::randn(0f32, 1.0, (tiles * patches, 3 * c), &Device::Cpu).unwrap();
        let got = super::blocked(&qkv, tiles, patches, heads).unwrap();
        let split = qkv
            .reshape((tiles, patches, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i| split.get(i).unwrap().contiguous().unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let want = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((tiles * patches, c))
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max abs difference {diff}");
        assert!(super::blocked(&qkv, tiles, patches + 1, heads).is_err());
    }
}
