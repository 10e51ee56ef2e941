//! One sequence stepped through the model's batched forward (a batch of one) over
//! a paged cache whose slots are simply `0..capacity`: for tests that run a
//! single prompt a chunk at a time.

use candle_core::Tensor;
use tessera_model::experts::{ExpertBackend, StepContext};
use tessera_model::language::{BatchSegment, ForwardTrace, LanguageModel, PagedKvCache};

pub struct OneSequence {
    pub cache: PagedKvCache,
    slots: Vec<u32>,
    len: usize,
}

impl OneSequence {
    /// An empty sequence with room for `capacity` positions.
    pub fn new(lm: &LanguageModel, capacity: usize) -> Self {
        Self {
            cache: lm.new_paged_cache(capacity).unwrap(),
            slots: (0..capacity as u32).collect(),
            len: 0,
        }
    }

    /// Positions computed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots of positions `0..len`.
    pub fn slots(&self) -> &[u32] {
        &self.slots[..self.len]
    }

    /// Runs `embeds` (tokens, hidden) at the next positions and returns the last
    /// one's logits; on an error nothing counts as computed.
    pub fn forward(
        &mut self,
        lm: &LanguageModel,
        embeds: &Tensor,
        experts: &dyn ExpertBackend,
        trace: Option<&mut ForwardTrace>,
    ) -> tessera_model::Result<Vec<f32>> {
        let t = embeds.dim(0)?;
        let segment = BatchSegment {
            embeds: embeds.clone(),
            start: self.len,
            slots: &self.slots[..self.len + t],
            logits: true,
        };
        let logits = match trace {
            Some(trace) => lm.forward_traced(&segment, &self.cache, experts, trace)?,
            None => lm
                .forward_batch(&[segment], &self.cache, experts, &StepContext::default(), 1)?
                .pop()
                .flatten()
                .expect("the segment asks for logits"),
        };
        self.len += t;
        Ok(logits)
    }
}
