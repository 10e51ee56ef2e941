//! Generated ids to text, a token at a time, and stop strings over that text.
//!
//! [`Detokenizer`] follows the incremental detokenization of Hugging Face's
//! text-generation-inference (`decode_token`) and vLLM
//! (`detokenize_incrementally`): it decodes only a short window of ids, from a
//! prefix offset that trails the last released text, so a token costs a constant
//! amount of work instead of a decode of the whole output. Text is released only
//! once it does not end in an incomplete UTF-8 character (U+FFFD).
//!
//! [`StopStrings`] is the one stop-string matcher: it finds the earliest stop
//! string in a text, how much of a text's end could still grow into one, and,
//! fed the text a piece at a time, whether one has appeared, looking only at
//! the new piece and the few bytes before it.

use crate::chat::ChatTokenizer;
use crate::error::Result;

/// Ids to text, special tokens kept.
pub trait Decode {
    fn decode_ids(&self, ids: &[u32]) -> Result<String>;
}

impl Decode for ChatTokenizer {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids, false)
    }
}

/// The text of a growing list of ids, released a piece at a time.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decoded window: context for the ids after `read`.
    prefix: usize,
    /// Ids up to here have had their text released.
    read: usize,
}

impl Detokenizer {
    /// Adds `id` and returns the text it completes (often empty for a token that
    /// ends inside a multi-byte character).
    pub fn push(&mut self, decoder: &impl Decode, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = decoder.decode_ids(&self.ids[self.prefix..self.read])?;
        let now = decoder.decode_ids(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let Some(new) = now.get(before.len()..) else {
            // The window's text changed before the release point; release nothing
            // now and start a fresh window at the next token.
            return Ok(String::new());
        };
        let new = new.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }

    /// Every id pushed.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// A request's stop strings (empty ones are ignored).
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Bytes of the longest stop string.
    longest: usize,
    /// The end of the text fed so far that a stop string could still start in.
    tail: String,
    found: bool,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            longest,
            tail: String::new(),
            found: false,
        }
    }

    /// Whether there is no stop string.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Byte offset of the earliest occurrence of any stop string in `text`.
    pub fn earliest(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Bytes at the end of `text` that are a proper prefix of a stop string (text
    /// to hold back while streaming: it may still become a stop string).
    pub fn partial_len(&self, text: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .map(|(i, _)| i)
                    .filter(|&i| i > 0 && text.ends_with(&s[..i]))
            })
            .max()
            .unwrap_or(0)
    }

    /// Feeds the next piece of the text; whether a stop string has appeared in
    /// the text fed so far.
    pub fn push(&mut self, piece: &str) -> bool {
        if self.found || self.stops.is_empty() || piece.is_empty() {
            return self.found;
        }
        self.tail.push_str(piece);
        self.found = self.stops.iter().any(|s| self.tail.contains(s.as_str()));
        // An occurrence that ends in a later piece starts at most longest − 1
        // bytes before it.
        let keep = self.longest.saturating_sub(1);
        if self.tail.len() > keep {
            let mut cut = self.tail.len() - keep;
            while !self.tail.is_char_boundary(cut) {
                cut -= 1;
            }
            self.tail.drain(..cut);
        }
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes each id as a fixed piece of bytes (lossy UTF-8, as tokenizers do).
    struct Bytes(Vec<&'static [u8]>);

    impl Decode for Bytes {
        fn decode_ids(&self, ids: &[u32]) -> Result<String> {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| self.0[i as usize])
                .copied()
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    #[test]
    fn pieces_concatenate_to_the_whole_decode_and_wait_for_whole_characters() {
        // "é" is two bytes, split over ids 1 and 2; "日" three, over 3, 4, 5.
        let d = Bytes(vec![
            b"Hi ",
            &[0xC3],
            &[0xA9],
            &[0xE6],
            &[0x97],
            &[0xA5],
            b"!",
        ]);
        let mut detok = Detokenizer::default();
        let pieces: Vec<String> = [0, 1, 2, 3, 4, 5, 6, 0]
            .iter()
            .map(|&id| detok.push(&d, id).unwrap())
            .collect();
        assert_eq!(pieces, ["Hi ", "", "é", "", "", "日", "!", "Hi "]);
        assert_eq!(pieces.concat(), d.decode_ids(detok.ids()).unwrap());
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_only_once_complete() {
        let mut stops = StopStrings::new(&["END".into(), String::new(), "ü!".into()]);
        assert!(!stops.push("the E"));
        assert!(!stops.push("N"));
        assert!(stops.push("Dgame"));
        assert!(stops.push("more"), "found stays found");
        let mut stops = StopStrings::new(&["ü!".into()]);
        assert!(!stops.push("aaü"));
        assert!(stops.push("!"));
        assert!(!StopStrings::new(&[]).push("anything"));
    }

    #[test]
    fn the_earliest_stop_wins_and_partial_stops_are_measured() {
        let stops = StopStrings::new(&["world".into(), "lo".into(), String::new()]);
        assert_eq!(stops.earliest("hello world"), Some(3));
        assert_eq!(stops.earliest("nothing here"), None);
        assert_eq!(stops.partial_len("hello wor"), 3);
        assert_eq!(stops.partial_len("heh"), 0);
        assert_eq!(stops.partial_len("say l"), 1);
    }
}
