//! Incremental detokenization: turns a growing list of generated ids into text
//! deltas that concatenate exactly to the whole answer's text.
//!
//! The answer's text is what `tessera generate` computes: the decode of the
//! generated ids with special tokens kept, without a final end-of-sequence token,
//! and, when a stop string stopped generation, cut before the earliest stop string.
//! A delta carries only text that is final: the whole prefix is decoded again each
//! time (decoders are not prefix-stable token by token), and the tail is held back
//! while it is an incomplete UTF-8 character (U+FFFD at the end of the decode) or
//! could still grow into a stop string. Stop strings are matched by the model
//! crate's one matcher ([`StopStrings`]), as the scheduler matches them.

use tessera_model::chat::ChatTokenizer;
use tessera_model::text::StopStrings;

use crate::error::{Error, Result};

/// What stopped generation, as far as the text is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The last id is the end-of-sequence token; it is not part of the text.
    Eos,
    /// The token limit; the text is the decode of every id.
    Length,
    /// A stop string; the text ends before the earliest one.
    Stop,
}

/// Ids to text, special tokens kept.
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

impl Decode for ChatTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        ChatTokenizer::decode(self, ids, false).map_err(Error::Tokenizer)
    }
}

/// The whole answer's text for the generated `ids`.
pub fn final_text(
    decoder: &impl Decode,
    ids: &[u32],
    ending: Ending,
    eos: u32,
    stop: &[String],
) -> Result<String> {
    let shown = match (ending, ids.split_last()) {
        (Ending::Eos, Some((&last, rest))) if last == eos => rest,
        _ => ids,
    };
    let mut text = decoder.decode(shown)?;
    if ending == Ending::Stop
        && let Some(cut) = StopStrings::new(stop).earliest(&text)
    {
        text.truncate(cut);
    }
    Ok(text)
}

/// The text of one generation, released as it becomes final.
#[derive(Debug, Clone)]
pub struct IncrementalText {
    ids: Vec<u32>,
    stop: Vec<String>,
    stops: StopStrings,
    eos: u32,
    ignore_eos: bool,
    emitted: String,
    /// A stop string has appeared: nothing after it is ever released.
    stopped: bool,
}

impl IncrementalText {
    /// A generation that stops at `stop` strings and, unless `ignore_eos`, at `eos`.
    pub fn new(stop: Vec<String>, eos: u32, ignore_eos: bool) -> Self {
        Self {
            ids: Vec::new(),
            stops: StopStrings::new(&stop),
            stop,
            eos,
            ignore_eos,
            emitted: String::new(),
            stopped: false,
        }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Every piece of text released so far, concatenated.
    pub fn emitted(&self) -> &str {
        &self.emitted
    }

    /// Adds newly generated ids without releasing text (for answers returned whole).
    pub fn push_ids(&mut self, new_ids: &[u32]) {
        self.ids.extend_from_slice(new_ids);
    }

    /// Adds newly generated ids and returns the text that became final (maybe empty).
    pub fn push(&mut self, decoder: &impl Decode, new_ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(new_ids);
        if self.stopped || new_ids.is_empty() {
            return Ok(String::new());
        }
        // A trailing end-of-sequence token ends generation and is never shown.
        let shown = match self.ids.split_last() {
            Some((&last, rest)) if last == self.eos && !self.ignore_eos => rest,
            _ => &self.ids[..],
        };
        let text = decoder.decode(shown)?;
        let complete = text.trim_end_matches(char::REPLACEMENT_CHARACTER);
        let safe = match self.stops.earliest(complete) {
            Some(cut) => {
                self.stopped = true;
                &complete[..cut]
            }
            None => &complete[..complete.len() - self.stops.partial_len(complete)],
        };
        Ok(self.release(safe))
    }

    /// Ends the generation and returns the rest of the whole answer's text.
    pub fn finish(&mut self, decoder: &impl Decode, ending: Ending) -> Result<String> {
        let text = final_text(decoder, &self.ids, ending, self.eos, &self.stop)?;
        if !text.starts_with(&self.emitted) {
            tracing::warn!(
                emitted = self.emitted.len(),
                total = text.len(),
                "the decoder is not prefix-stable; the streamed text differs from the answer"
            );
        }
        let delta = self.release(&text);
        self.stopped = true;
        Ok(delta)
    }

    /// Releases what `safe` adds to the text released so far.
    fn release(&mut self, safe: &str) -> String {
        match safe.strip_prefix(self.emitted.as_str()) {
            Some(delta) if !delta.is_empty() => {
                self.emitted.push_str(delta);
                delta.to_owned()
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
#[path = "detokenize_tests.rs"]
mod tests;
