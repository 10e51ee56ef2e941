//! The one codec between candle tensors and wire tensors
//! ([`internal::v1::Tensor`](crate::internal::v1::Tensor)): dtype, shape, and the
//! elements in row-major order as little-endian bytes.
//!
//! [`decode`] trusts nothing: it rejects unknown dtypes, shapes whose size
//! overflows, and byte buffers that are not exactly `product(shape) × dtype size`
//! long.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use prost::bytes::Bytes;

use crate::internal::v1 as pb;

/// Why a tensor could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The tensor's dtype has no wire form.
    #[error("tensor dtype {0:?} cannot be sent (supported: f32, f16, bf16, u32, i64)")]
    UnsupportedDType(DType),
    /// The wire dtype is unset or not one this build knows.
    #[error("unknown tensor dtype {0} on the wire (expected F32, F16, BF16, U32 or I64)")]
    UnknownDType(i32),
    /// The shape's element or byte count does not fit in memory.
    #[error("tensor shape {shape:?} is too large")]
    ShapeOverflow {
        /// The shape on the wire.
        shape: Vec<u64>,
    },
    /// The data is not exactly `product(shape) × dtype size` bytes long.
    #[error(
        "tensor data is {actual} bytes but dtype {dtype:?} and shape {shape:?} need {expected}"
    )]
    LengthMismatch {
        /// The wire dtype.
        dtype: pb::Dtype,
        /// The shape on the wire.
        shape: Vec<u64>,
        /// Bytes the dtype and shape need.
        expected: usize,
        /// Bytes received.
        actual: usize,
    },
    /// candle failed to read or build the tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Encodes `t` (on any device, any layout) for the wire.
pub fn encode(t: &Tensor) -> Result<pb::Tensor, CodecError> {
    let shape = t.dims().iter().map(|&d| d as u64).collect();
    let flat = t.flatten_all()?;
    let (dtype, data) = match t.dtype() {
        DType::F32 => (
            pb::Dtype::F32,
            le_bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes),
        ),
        DType::F16 => (
            pb::Dtype::F16,
            le_bytes(flat.to_vec1::<f16>()?, f16::to_le_bytes),
        ),
        DType::BF16 => (
            pb::Dtype::Bf16,
            le_bytes(flat.to_vec1::<bf16>()?, bf16::to_le_bytes),
        ),
        DType::U32 => (
            pb::Dtype::U32,
            le_bytes(flat.to_vec1::<u32>()?, u32::to_le_bytes),
        ),
        DType::I64 => (
            pb::Dtype::I64,
            le_bytes(flat.to_vec1::<i64>()?, i64::to_le_bytes),
        ),
        other => return Err(CodecError::UnsupportedDType(other)),
    };
    Ok(pb::Tensor {
        dtype: dtype as i32,
        shape,
        data: Bytes::from(data),
    })
}

/// Decodes a wire tensor onto `device`, after checking its dtype and byte length.
pub fn decode(t: &pb::Tensor, device: &Device) -> Result<Tensor, CodecError> {
    let dtype = pb::Dtype::try_from(t.dtype)
        .ok()
        .filter(|d| *d != pb::Dtype::Unspecified)
        .ok_or(CodecError::UnknownDType(t.dtype))?;
    let overflow = || CodecError::ShapeOverflow {
        shape: t.shape.clone(),
    };
    let dims = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<Result<Vec<usize>, _>>()?;
    let elems = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    // A zero dimension makes the product 0, but the strides multiply the others: they
    // must fit too.
    dims.iter()
        .filter(|&&d| d > 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    let expected = elems.checked_mul(size_of(dtype)).ok_or_else(overflow)?;
    if t.data.len() != expected {
        return Err(CodecError::LengthMismatch {
            dtype,
            shape: t.shape.clone(),
            expected,
            actual: t.data.len(),
        });
    }
    let data = &t.data[..];
    let tensor = match dtype {
        pb::Dtype::F32 => Tensor::from_vec(from_le(data, f32::from_le_bytes), dims, device),
        pb::Dtype::F16 => Tensor::from_vec(from_le(data, f16::from_le_bytes), dims, device),
        pb::Dtype::Bf16 => Tensor::from_vec(from_le(data, bf16::from_le_bytes), dims, device),
        pb::Dtype::U32 => Tensor::from_vec(from_le(data, u32::from_le_bytes), dims, device),
        pb::Dtype::I64 => Tensor::from_vec(from_le(data, i64::from_le_bytes), dims, device),
        pb::Dtype::Unspecified => unreachable!("rejected above"),
    }?;
    Ok(tensor)
}

/// Bytes of one element of `dtype`.
fn size_of(dtype: pb::Dtype) -> usize {
    match dtype {
        pb::Dtype::Unspecified => 0,
        pb::Dtype::F16 | pb::Dtype::Bf16 => 2,
        pb::Dtype::F32 | pb::Dtype::U32 => 4,
        pb::Dtype::I64 => 8,
    }
}

/// The little-endian bytes of `values`, in order.
fn le_bytes<T, const N: usize>(values: Vec<T>, to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for v in values {
        out.extend_from_slice(&to_le(v));
    }
    out
}

/// The values whose little-endian bytes are `data` (a whole number of elements).
fn from_le<T, const N: usize>(data: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| from_le(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        Device::Cpu
    }

    /// Bits of every element, to compare bitwise (NaN payloads, -0.0).
    fn bits(t: &Tensor) -> Vec<u8> {
        encode(t).unwrap().data.to_vec()
    }

    #[test]
    fn f32_round_trip_is_bitwise() {
        let values = vec![
            0.0f32,
            -0.0,
            1.5,
            -3.25,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::NAN,
        ];
        let t = Tensor::from_vec(values.clone(), (7,), &cpu()).unwrap();
        let wire = encode(&t).unwrap();
        assert_eq!(wire.dtype, pb::Dtype::F32 as i32);
        assert_eq!(wire.shape, vec![7]);
        assert_eq!(wire.data.len(), 28);
        assert_eq!(&wire.data[4..8], &(-0.0f32).to_le_bytes());
        let back = decode(&wire, &cpu()).unwrap();
        assert_eq!(back.dtype(), DType::F32);
        let got: Vec<u32> = back
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn f16_and_bf16_round_trip_is_bitwise() {
        let raw: Vec<u16> = vec![
            0x0000, 0x8000, 0x3c00, 0x7bff, 0x0001, 0x7e01, 0xfc00, 0x1234,
        ];
        let h: Vec<f16> = raw.iter().map(|&b| f16::from_bits(b)).collect();
        let b: Vec<bf16> = raw.iter().map(|&b| bf16::from_bits(b)).collect();
        for t in [
            Tensor::from_vec(h, (2, 4), &cpu()).unwrap(),
            Tensor::from_vec(b, (4, 2), &cpu()).unwrap(),
        ] {
            let wire = encode(&t).unwrap();
            let want: Vec<u8> = raw.iter().flat_map(|b| b.to_le_bytes()).collect();
            assert_eq!(wire.data.to_vec(), want, "{:?}", t.dtype());
            let back = decode(&wire, &cpu()).unwrap();
            assert_eq!(back.dtype(), t.dtype());
            assert_eq!(back.dims(), t.dims());
            assert_eq!(bits(&back), want);
        }
    }

    #[test]
    fn u32_and_i64_round_trip() {
        let u = Tensor::from_vec(vec![0u32, 1, 0xdead_beef, u32::MAX], (2, 2), &cpu()).unwrap();
        let back = decode(&encode(&u).unwrap(), &cpu()).unwrap();
        assert_eq!(back.to_vec2::<u32>().unwrap(), u.to_vec2::<u32>().unwrap());

        let i = Tensor::from_vec(vec![i64::MIN, -1, 0, i64::MAX], (4,), &cpu()).unwrap();
        let back = decode(&encode(&i).unwrap(), &cpu()).unwrap();
        assert_eq!(
            back.to_vec1::<i64>().unwrap(),
            vec![i64::MIN, -1, 0, i64::MAX]
        );
    }

    #[test]
    fn strided_scalar_and_empty_tensors_round_trip() {
        let t = Tensor::arange(0f32, 12.0, &cpu())
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let tt = t.t().unwrap();
        let back = decode(&encode(&tt).unwrap(), &cpu()).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), tt.to_vec2::<f32>().unwrap());

        let s = Tensor::new(2.5f32, &cpu()).unwrap();
        let wire = encode(&s).unwrap();
        assert!(wire.shape.is_empty());
        assert_eq!(
            decode(&wire, &cpu()).unwrap().to_scalar::<f32>().unwrap(),
            2.5
        );

        let e = Tensor::zeros((0, 8), DType::BF16, &cpu()).unwrap();
        let wire = encode(&e).unwrap();
        assert!(wire.data.is_empty());
        assert_eq!(decode(&wire, &cpu()).unwrap().dims(), &[0, 8]);
    }

    #[test]
    fn rejects_wrong_byte_lengths() {
        let wire = encode(&Tensor::ones((2, 3), DType::F32, &cpu()).unwrap()).unwrap();
        for len in [0, 23, 25, 48] {
            let mut bad = wire.clone();
            bad.data = Bytes::from(vec![0u8; len]);
            match decode(&bad, &cpu()) {
                Err(CodecError::LengthMismatch {
                    expected: 24,
                    actual,
                    ..
                }) => assert_eq!(actual, len),
                other => panic!("len {len}: expected LengthMismatch, got {other:?}"),
            }
        }
        let mut bad = wire;
        bad.data = Bytes::from(vec![0u8; 20]);
        let msg = decode(&bad, &cpu()).unwrap_err().to_string();
        assert!(msg.contains("20 bytes") && msg.contains("need 24"), "{msg}");
    }

    #[test]
    fn rejects_unknown_dtype_and_overflowing_shape() {
        let mut wire = encode(&Tensor::ones(4, DType::U32, &cpu()).unwrap()).unwrap();
        for dtype in [0, 6, -1, 99] {
            wire.dtype = dtype;
            assert!(
                matches!(decode(&wire, &cpu()), Err(CodecError::UnknownDType(d)) if d == dtype),
                "dtype {dtype}"
            );
        }
        wire.dtype = pb::Dtype::U32 as i32;
        wire.shape = vec![u64::MAX, 2];
        assert!(matches!(
            decode(&wire, &cpu()),
            Err(CodecError::ShapeOverflow { .. })
        ));
        // No elements, but the other dimensions' strides overflow (found by
        // `tests/fuzz.rs`; candle would panic computing them).
        wire.shape = vec![0, 1 << 40, 1 << 40];
        wire.data = Default::default();
        assert!(matches!(
            decode(&wire, &cpu()),
            Err(CodecError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn rejects_unsupported_dtype_on_encode() {
        let t = Tensor::zeros(3, DType::F64, &cpu()).unwrap();
        assert!(matches!(
            encode(&t),
            Err(CodecError::UnsupportedDType(DType::F64))
        ));
    }
}
