//! Tests of incremental detokenization: with a byte-level decoder whose tokens split
//! multi-byte characters, with stop strings, and with a fixture's real tokenizer.

use super::*;
use tessera_model::chat::ChatTokenizer;

/// A byte-level decoder like the models' (ByteLevel + `from_utf8_lossy`): token `i`
/// is the byte string `vocab[i]`.
struct Bytes {
    vocab: Vec<Vec<u8>>,
}

impl Bytes {
    /// One token per piece.
    fn of(pieces: &[&[u8]]) -> Self {
        Self {
            vocab: pieces.iter().map(|p| p.to_vec()).collect(),
        }
    }

    /// One token per byte of `text`, then the `<eos>` token.
    fn per_byte(text: &str) -> (Self, Vec<u32>) {
        let mut vocab: Vec<Vec<u8>> = text.bytes().map(|b| vec![b]).collect();
        let ids = (0..vocab.len() as u32).collect();
        vocab.push(b"<eos>".to_vec());
        (Self { vocab }, ids)
    }

    fn eos(&self) -> u32 {
        self.vocab.len() as u32 - 1
    }
}

impl Decode for Bytes {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.vocab[i as usize].iter().copied())
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Generates like the scheduler (stop after the first token whose text contains a stop
/// string), streams the ids in batches of `batch` and checks every delta against the
/// answer. Returns the deltas.
fn stream(
    decoder: &impl Decode,
    ids: &[u32],
    eos: u32,
    stop: &[&str],
    batch: usize,
) -> (Vec<String>, String, Ending) {
    let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
    let mut generated = Vec::new();
    let mut ending = Ending::Length;
    for &id in ids {
        generated.push(id);
        if id == eos {
            ending = Ending::Eos;
            break;
        }
        let text = decoder.decode(&generated).unwrap();
        if StopStrings::new(&stop).earliest(&text).is_some() {
            ending = Ending::Stop;
            break;
        }
    }
    let mut inc = IncrementalText::new(stop.clone(), eos, false);
    let mut deltas = Vec::new();
    for chunk in generated.chunks(batch) {
        deltas.push(inc.push(decoder, chunk).unwrap());
    }
    deltas.push(inc.finish(decoder, ending).unwrap());
    let answer = final_text(decoder, &generated, ending, eos, &stop).unwrap();
    assert_eq!(deltas.concat(), answer, "batch {batch}, stop {stop:?}");
    assert_eq!(inc.emitted(), answer);
    assert_eq!(inc.ids(), &generated[..]);
    (deltas, answer, ending)
}

#[test]
fn multi_byte_characters_split_across_tokens_are_held_until_complete() {
    let text = "héllo 中文 😀!";
    let (decoder, ids) = Bytes::per_byte(text);
    let (deltas, answer, ending) = stream(&decoder, &ids, decoder.eos(), &[], 1);
    assert_eq!((answer.as_str(), ending), (text, Ending::Length));
    // Each character is released whole, by the token that completes it.
    assert!(
        deltas
            .iter()
            .all(|d| !d.contains(char::REPLACEMENT_CHARACTER))
    );
    let released: Vec<&str> = deltas
        .iter()
        .map(String::as_str)
        .filter(|d| !d.is_empty())
        .collect();
    assert_eq!(
        released,
        ["h", "é", "l", "l", "o", " ", "中", "文", " ", "😀", "!"]
    );
    for batch in 2..6 {
        stream(&decoder, &ids, decoder.eos(), &[], batch);
    }
}

#[test]
fn invalid_bytes_stay_replacement_characters_in_the_answer() {
    // A lone continuation byte never completes: it is released once text follows it,
    // and at the end even when nothing follows.
    let decoder = Bytes::of(&[b"a", b"\x80", b"b", b"\xe4\xb8"]);
    let (deltas, answer, _) = stream(&decoder, &[0, 1, 2, 1], u32::MAX, &[], 1);
    assert_eq!(answer, "a\u{FFFD}b\u{FFFD}");
    assert_eq!(deltas, ["a", "", "\u{FFFD}b", "", "\u{FFFD}"]);
    let (_, cut, _) = stream(&decoder, &[0, 3], u32::MAX, &[], 1);
    assert_eq!(cut, "a\u{FFFD}");
}

#[test]
fn a_possible_stop_string_is_held_back_and_the_answer_ends_before_it() {
    let decoder = Bytes::of(&[b"Hel", b"lo", b" wo", b"rld", b" and", b" more"]);
    let (deltas, answer, ending) = stream(&decoder, &[0, 1, 2, 3, 4], u32::MAX, &["o world"], 1);
    assert_eq!((answer.as_str(), ending), ("Hell", Ending::Stop));
    // "Hello" could be the start of "o world": the "o" waits; " wo" still could be.
    assert_eq!(deltas, ["Hel", "l", "", "", ""]);

    // A prefix that turns out not to be a stop string is released with what follows.
    let (deltas, answer, ending) = stream(&decoder, &[0, 1, 4, 5], u32::MAX, &["o world"], 1);
    assert_eq!(
        (answer.as_str(), ending),
        ("Hello and more", Ending::Length)
    );
    assert_eq!(deltas, ["Hel", "l", "o and", " more", ""]);
}

#[test]
fn the_earliest_of_several_stop_strings_wins_in_every_batching() {
    let decoder = Bytes::of(&[b"ab", b"cd", b"ef", b"\xe4\xb8", b"\xad", b"gh"]);
    let ids = [0, 1, 3, 4, 2, 5];
    for batch in 1..=ids.len() {
        let (_, answer, ending) = stream(&decoder, &ids, u32::MAX, &["fg", "d中e"], batch);
        assert_eq!((answer.as_str(), ending), ("abc", Ending::Stop));
        let (_, answer, _) = stream(&decoder, &ids, u32::MAX, &["中"], batch);
        assert_eq!(answer, "abcd");
        let (_, answer, ending) = stream(&decoder, &ids, u32::MAX, &["zz", "hx"], batch);
        assert_eq!((answer.as_str(), ending), ("abcd中efgh", Ending::Length));
    }
}

#[test]
fn a_final_end_of_sequence_token_is_never_shown() {
    let decoder = Bytes::of(&[b"Yes", b".", b"<eos>"]);
    for batch in 1..=3 {
        let (deltas, answer, ending) = stream(&decoder, &[0, 1, 2], 2, &[], batch);
        assert_eq!((answer.as_str(), ending), ("Yes.", Ending::Eos));
        assert!(deltas.iter().all(|d| !d.contains("<eos>")));
    }
    // With ignore_eos the token is ordinary text.
    let mut inc = IncrementalText::new(Vec::new(), 2, true);
    assert_eq!(inc.push(&decoder, &[0, 2]).unwrap(), "Yes<eos>");
    assert_eq!(inc.finish(&decoder, Ending::Length).unwrap(), "");
}

#[test]
fn the_fixture_tokenizers_stream_to_their_own_decode() {
    let dir = crate::model_files::tests::fixture("tiny-mha-softmax");
    // The fixture's small vocabulary, then the released DeepSeek-VL2 tokenizer.
    for (dir, splits_characters) in [(dir.clone(), true), (dir.join("real-tokenizer"), false)] {
        let tokenizer = ChatTokenizer::from_dir(&dir).unwrap();
        stream_with(&tokenizer, splits_characters);
    }
}

fn stream_with(tokenizer: &ChatTokenizer, splits_characters: bool) {
    let text = "Le café coûte 3€ — 中文字符 and emoji 🎉🎉 <|ref|>cat<|/ref|>";
    let ids = tokenizer.encode(text).unwrap();
    if splits_characters {
        // Some characters are split across byte-level tokens.
        let pieces: Vec<String> = ids
            .iter()
            .map(|&i| ChatTokenizer::decode(tokenizer, &[i], false).unwrap())
            .collect();
        assert!(
            pieces
                .iter()
                .any(|p| p.contains(char::REPLACEMENT_CHARACTER))
        );
    }
    let eos = tokenizer.special().eos;
    for batch in [1, 2, 3, 7] {
        let (_, answer, _) = stream(tokenizer, &ids, eos, &[], batch);
        assert_eq!(answer, Decode::decode(tokenizer, &ids).unwrap());
        let (_, cut, ending) = stream(tokenizer, &ids, eos, &["字符", "🎉"], batch);
        assert_eq!(
            (cut.as_str(), ending),
            ("Le café coûte 3€ — 中文", Ending::Stop)
        );
    }
    // A final EOS ends the answer without being part of its text.
    let mut with_eos = ids.clone();
    with_eos.push(eos);
    let (_, answer, ending) = stream(tokenizer, &with_eos, eos, &[], 4);
    assert_eq!(ending, Ending::Eos);
    assert_eq!(answer, Decode::decode(tokenizer, &ids).unwrap());
}

#[test]
fn partial_stops_are_suffixes_that_start_a_stop_string() {
    let stop = StopStrings::new(&["world".to_string(), "中文".to_string()]);
    assert_eq!(stop.partial_len("hello wor"), 3);
    assert_eq!(stop.partial_len("hello 中"), "中".len());
    assert_eq!(stop.partial_len("hello"), 0);
    assert_eq!(stop.partial_len("world"), 0);
}
