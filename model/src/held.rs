//! Bytes of weights a loaded part of the model holds, as it holds them (what
//! `--weights` chose: a bf16 checkpoint kept as bf16 holds two bytes per value). Views
//! into another held tensor are not counted twice.

use candle_core::Tensor;

use crate::linear::Linear;

/// A loaded part of the model that can say how many bytes of weights it holds.
pub trait Held {
    fn held_bytes(&self) -> usize;
}

impl Held for Tensor {
    fn held_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_in_bytes()
    }
}

impl Held for Linear {
    fn held_bytes(&self) -> usize {
        self.bytes()
    }
}

impl<T: Held + ?Sized> Held for &T {
    fn held_bytes(&self) -> usize {
        (**self).held_bytes()
    }
}

impl<T: Held> Held for Option<T> {
    fn held_bytes(&self) -> usize {
        self.as_ref().map_or(0, Held::held_bytes)
    }
}

impl<T: Held> Held for [T] {
    fn held_bytes(&self) -> usize {
        self.iter().map(Held::held_bytes).sum()
    }
}

impl<T: Held> Held for Vec<T> {
    fn held_bytes(&self) -> usize {
        self.as_slice().held_bytes()
    }
}

impl Held for f32 {
    fn held_bytes(&self) -> usize {
        4
    }
}

/// `held!(a, b, …)`: the sum of the parts' held bytes.
macro_rules! held {
    ($($part:expr),* $(,)?) => {
        0usize $(+ $crate::held::Held::held_bytes(&$part))*
    };
}
pub(crate) use held;
