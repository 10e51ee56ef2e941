//! Many sequences in one forward step (continuous batching): every token of every
//! sequence goes through the projections, norms, gates and MLPs together, while
//! attention runs per sequence against that sequence's rows of a [`PagedKvCache`]
//! (no padding to the longest sequence).
//!
//! The step can be split into two micro-batches of whole sequences that take turns
//! layer by layer: while one micro-batch's routed experts are in flight
//! ([`ExpertBackend::start`]), the other's attention runs (ping-pong overlap).

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::attention::{Projected, causal_mask};
use super::model::{DecoderLayer, FeedForward, ForwardTrace, LanguageModel};
use super::moe::MoePending;
use super::paged::PagedKvCache;
use crate::error::{Error, Result};
use crate::experts::{ExpertBackend, StepContext};
use crate::ops::rms_norm;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct BatchSegment<'a> {
    /// Input embeddings of this step's tokens of the sequence: (tokens, hidden).
    pub embeds: Tensor,
    /// Position of the first of them (positions before it are cached).
    pub start: usize,
    /// Cache slots of positions `0..start + tokens` (the block table, expanded).
    pub slots: &'a [u32],
    /// Whether the last token's logits are wanted (the end of a prompt, or decode).
    pub logits: bool,
}

/// Splits segments with `tokens[i]` tokens each into at most `parts` (1 or 2)
/// contiguous groups of nearly equal token counts; every group is non-empty.
pub fn micro_batches(tokens: &[usize], parts: usize) -> Vec<Range<usize>> {
    let n = tokens.len();
    if parts < 2 || n < 2 {
        return std::iter::once(0..n).collect();
    }
    let total: usize = tokens.iter().sum();
    let mut best = (usize::MAX, 1);
    let mut prefix = 0;
    for (i, &t) in tokens.iter().enumerate().take(n - 1) {
        prefix += t;
        let imbalance = (2 * prefix).abs_diff(total);
        if imbalance < best.0 {
            best = (imbalance, i + 1);
        }
    }
    vec![0..best.1, best.1..n]
}

/// A group of segments going through the layers together.
struct MicroBatch<'e> {
    segments: Range<usize>,
    /// Row of each segment's first token within `h`.
    offsets: Vec<usize>,
    /// Hidden states (tokens, hidden).
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    masks: Vec<Option<Tensor>>,
    /// The previous MoE layer's routed experts, in flight.
    pending: Option<MoePending<'e>>,
}

impl LanguageModel {
    /// Runs one step of many sequences: each segment's tokens at its positions,
    /// writing their cache rows at their slots. Returns, per segment, the last token's
    /// logits (vocab,) in f32 when asked for. `micro_batches` is 1 (one batch) or 2
    /// (overlap expert calls with the other half's attention). Every expert call
    /// carries `step`.
    pub fn forward_batch(
        &self,
        segments: &[BatchSegment<'_>],
        cache: &PagedKvCache,
        experts: &dyn ExpertBackend,
        step: &StepContext,
        micro_batches: usize,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.run_step(segments, cache, experts, step, micro_batches, None)
    }

    /// [`forward_batch`](Self::forward_batch) of one segment, recording its last
    /// position's hidden states and every MoE layer's routing in `trace` (golden
    /// tests, debugging). Returns the last token's logits (vocab,) in f32.
    pub fn forward_traced(
        &self,
        segment: &BatchSegment<'_>,
        cache: &PagedKvCache,
        experts: &dyn ExpertBackend,
        trace: &mut ForwardTrace,
    ) -> Result<Vec<f32>> {
        let segment = BatchSegment {
            logits: true,
            ..segment.clone()
        };
        let step = StepContext::default();
        let mut out = self.run_step(&[segment], cache, experts, &step, 1, Some(trace))?;
        Ok(out
            .pop()
            .flatten()
            .expect("the one segment asks for logits"))
    }

    fn run_step(
        &self,
        segments: &[BatchSegment<'_>],
        cache: &PagedKvCache,
        experts: &dyn ExpertBackend,
        step: &StepContext,
        micro_batches: usize,
        mut trace: Option<&mut ForwardTrace>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let mut counts = Vec::with_capacity(segments.len());
        for (i, seg) in segments.iter().enumerate() {
            let (t, hidden) = seg.embeds.dims2()?;
            if t == 0 || hidden != self.cfg.hidden_size {
                return Err(Error::Request(format!(
                    "segment {i}: embeddings are ({t}, {hidden}); expected (≥1, {})",
                    self.cfg.hidden_size
                )));
            }
            if seg.slots.len() != seg.start + t {
                return Err(Error::Request(format!(
                    "segment {i}: {} cache slots for positions 0..{}",
                    seg.slots.len(),
                    seg.start + t
                )));
            }
            counts.push(t);
        }
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let mut groups = Vec::new();
        for range in self::micro_batches(&counts, micro_batches) {
            groups.push(self.micro_batch(segments, range)?);
        }
        // A trace follows the last token of the one segment.
        let last = |h: &Tensor| h.narrow(0, h.dim(0)? - 1, 1)?.squeeze(0);
        for (l, layer) in self.layers.iter().enumerate() {
            for mb in &mut groups {
                if let Some(pending) = mb.pending.take() {
                    mb.h = (&mb.h + pending.finish()?)?;
                }
                if let Some(tr) = trace.as_deref_mut() {
                    // The input embedding, then the output of layer l − 1.
                    tr.hidden_last.push(last(&mb.h)?);
                }
                let routing = self.layer_step(l, layer, mb, segments, cache, experts, step)?;
                if let (Some(tr), Some(routing)) = (trace.as_deref_mut(), routing) {
                    tr.routing.push((l, routing));
                }
            }
        }
        for mb in &mut groups {
            if let Some(pending) = mb.pending.take() {
                mb.h = (&mb.h + pending.finish()?)?;
            }
        }
        self.logits(segments, &groups, trace)
    }

    fn micro_batch<'e>(
        &self,
        segments: &[BatchSegment<'_>],
        range: Range<usize>,
    ) -> Result<MicroBatch<'e>> {
        let mut offsets = Vec::with_capacity(range.len());
        let (mut embeds, mut cos, mut sin, mut masks) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        for seg in &segments[range.clone()] {
            let t = seg.embeds.dim(0)?;
            offsets.push(offset);
            offset += t;
            embeds.push(seg.embeds.to_dtype(self.dtype)?);
            let (c, s) = self
                .rope
                .tables(seg.start, t, seg.start + t, self.dtype, &self.device)?;
            cos.push(c);
            sin.push(s);
            masks.push(causal_mask(seg.start, t, self.dtype, &self.device)?);
        }
        let cat = |parts: Vec<Tensor>| -> Result<Tensor> {
            Ok(if parts.len() == 1 {
                parts.into_iter().next().expect("one part")
            } else {
                Tensor::cat(&parts, 0)?
            })
        };
        Ok(MicroBatch {
            segments: range,
            offsets,
            h: cat(embeds)?,
            cos: cat(cos)?,
            sin: cat(sin)?,
            masks,
            pending: None,
        })
    }

    /// Layer `l` for one micro-batch: attention, then the dense MLP, or the MoE
    /// block's shared experts with its routed experts left in flight. Returns the
    /// MoE layer's routing.
    #[allow(clippy::too_many_arguments)] // one layer of one micro-batch of one step
    fn layer_step<'e>(
        &self,
        l: usize,
        layer: &DecoderLayer,
        mb: &mut MicroBatch<'e>,
        segments: &[BatchSegment<'_>],
        cache: &PagedKvCache,
        experts: &'e dyn ExpertBackend,
        step: &StepContext,
    ) -> Result<Option<super::moe::Routing>> {
        let eps = self.cfg.rms_norm_eps;
        let normed = rms_norm(&mb.h, &layer.input_layernorm, eps)?;
        let Projected { queries, rows } = layer.attention.project(&normed, &mb.cos, &mb.sin)?;
        let mut outs = Vec::with_capacity(mb.offsets.len());
        for (k, seg) in segments[mb.segments.clone()].iter().enumerate() {
            let (off, t) = (mb.offsets[k], seg.embeds.dim(0)?);
            let new = [rows[0].narrow(0, off, t)?, rows[1].narrow(0, off, t)?];
            cache.write(l, &seg.slots[seg.start..], [&new[0], &new[1]])?;
            let [a, b] = cache.gather(l, seg.slots)?;
            let q = queries.narrow(off, t)?;
            outs.push(layer.attention.attend(&q, [&a, &b], mb.masks[k].as_ref())?);
        }
        let o = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        mb.h = (&mb.h + layer.attention.output(&o)?)?;
        let normed = rms_norm(&mb.h, &layer.post_attention_layernorm, eps)?;
        match &layer.ffn {
            FeedForward::Dense(mlp) => {
                mb.h = (&mb.h + mlp.forward(&normed)?)?;
                Ok(None)
            }
            FeedForward::Moe(moe) => {
                let (pending, routing) = moe.start(&normed, experts, step)?;
                mb.pending = Some(pending);
                Ok(Some(routing))
            }
        }
    }

    /// Final norm and LM head over the last token of each segment that wants logits.
    fn logits(
        &self,
        segments: &[BatchSegment<'_>],
        groups: &[MicroBatch<'_>],
        trace: Option<&mut ForwardTrace>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let mut rows = Vec::new();
        for mb in groups {
            let mut idx = Vec::new();
            for (k, seg) in segments[mb.segments.clone()].iter().enumerate() {
                if seg.logits {
                    idx.push((mb.offsets[k] + seg.embeds.dim(0)? - 1) as u32);
                }
            }
            if !idx.is_empty() {
                let idx = Tensor::from_vec(idx.clone(), idx.len(), &self.device)?;
                rows.push(mb.h.index_select(&idx, 0)?);
            }
        }
        let mut out = vec![None; segments.len()];
        if rows.is_empty() {
            return Ok(out);
        }
        let last = Tensor::cat(&rows, 0)?; // (wanted, hidden)
        let normed = rms_norm(&last, &self.norm, self.cfg.rms_norm_eps)?;
        if let Some(tr) = trace {
            tr.hidden_last.push(normed.narrow(0, 0, 1)?.squeeze(0)?);
        }
        let logits = self
            .lm_head
            .forward(&normed)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let wanted = segments
            .iter()
            .enumerate()
            .filter(|(_, s)| s.logits)
            .map(|(i, _)| i);
        for (i, row) in wanted.zip(logits) {
            out[i] = Some(row);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::micro_batches;

    #[test]
    fn micro_batches_balance_tokens_and_are_never_empty() {
        assert_eq!(micro_batches(&[5], 2), vec![0..1]);
        assert_eq!(micro_batches(&[1, 1, 1, 1], 1), vec![0..4]);
        assert_eq!(micro_batches(&[1, 1, 1, 1], 2), vec![0..2, 2..4]);
        assert_eq!(micro_batches(&[64, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(micro_batches(&[1, 1, 1, 64], 2), vec![0..3, 3..4]);
        assert_eq!(micro_batches(&[], 2), vec![0..0]);
    }
}
