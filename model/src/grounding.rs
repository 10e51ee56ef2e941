//! Grounding markup in model answers (the format of the DeepSeek-VL2 README and demo): the model
//! writes `<|ref|>phrase<|/ref|><|det|>[[x1, y1, x2, y2], …]<|/det|>` with integer
//! coordinates normalised to 0…999 of the original image; the demo's parser turns them
//! into pixels with `int(x / 999 · width)`.
//!
//! Model output is not always well formed (truncated at `max_new_tokens`, a missing
//! `<|/det|>`, a garbled number), so the parser is lenient: it keeps every box that
//! reads as exactly four numbers in brackets, clamps values to 0…999, orders each
//! corner pair, skips the rest, and never panics.

use serde::Serialize;

/// A box in pixels of the original image, `x1 <= x2`, `y1 <= y2`.
///
/// A coordinate of 999 maps to `width`/`height` itself, one past the last pixel, as in
/// the reference demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct GroundedBox {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

/// A box as the model wrote it: 0…999 relative to the image, clamped and with
/// `x1 <= x2`, `y1 <= y2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct NormalizedBox {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

/// The boxes of one `<|det|>` block and the phrase of the `<|ref|>` before it (empty
/// when the block has no reference). Always holds at least one box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grounding {
    pub label: String,
    pub boxes: Vec<NormalizedBox>,
}

/// Largest normalised coordinate.
const MAX_COORD: u32 = 999;

impl NormalizedBox {
    /// Pixel box in an image of `width` × `height`: `int(x / 999 · width)`, computed in
    /// f64 in the reference's order so truncation matches Python bit for bit.
    pub fn to_pixels(&self, width: u32, height: u32) -> GroundedBox {
        let scale = |v: u32, size: u32| (f64::from(v) / 999.0 * f64::from(size)) as u32;
        GroundedBox {
            x1: scale(self.x1, width),
            y1: scale(self.y1, height),
            x2: scale(self.x2, width),
            y2: scale(self.y2, height),
        }
    }

    /// Builds a box from four written values: clamped to 0…999, corners ordered.
    fn from_values(v: [f64; 4]) -> Self {
        // `as` saturates and maps NaN to 0; the clamp keeps 0..=999.
        let c = |x: f64| (x.clamp(0.0, f64::from(MAX_COORD))) as u32;
        let (x1, y1, x2, y2) = (c(v[0]), c(v[1]), c(v[2]), c(v[3]));
        Self {
            x1: x1.min(x2),
            y1: y1.min(y2),
            x2: x1.max(x2),
            y2: y1.max(y2),
        }
    }
}

/// Every `<|det|>` block of `text` with at least one readable box, in order.
///
/// A block takes the phrase of the nearest `<|ref|>…<|/ref|>` before it that no other
/// block has taken yet; a block missing `<|/det|>` ends at the next marker or at the
/// end of the text.
pub fn parse_groundings(text: &str) -> Vec<Grounding> {
    let mut out = Vec::new();
    let mut pending_label: Option<String> = None;
    for part in parse_parts(text) {
        match part {
            Part::Ref(label) => pending_label = Some(label.trim().to_string()),
            Part::Det(body) => {
                let label = pending_label.take().unwrap_or_default();
                let boxes = parse_boxes(body);
                if !boxes.is_empty() {
                    out.push(Grounding { label, boxes });
                }
            }
            Part::Text(_) => {}
        }
    }
    out
}

/// The answer with the markup removed: `<|det|>` blocks (with their boxes) and the
/// `<|grounding|>`, `<|ref|>` and `<|/ref|>` markers go, the phrases stay. Leading and
/// trailing whitespace is trimmed.
pub fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for part in parse_parts(text) {
        match part {
            Part::Text(s) | Part::Ref(s) => out.push_str(s),
            Part::Det(_) => {}
        }
    }
    out.trim().to_string()
}

const REF_OPEN: &str = "<|ref|>";
const REF_CLOSE: &str = "<|/ref|>";
const DET_OPEN: &str = "<|det|>";
const DET_CLOSE: &str = "<|/det|>";
const GROUNDING: &str = "<|grounding|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    RefOpen,
    RefClose,
    DetOpen,
    DetClose,
    Grounding,
}

/// A piece of `text` between markers, or a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Text(&'a str),
    Marker(Marker),
}

/// Splits `text` at the five grounding markers; any other `<|` is plain text.
fn tokenize(text: &str) -> Vec<Token<'_>> {
    const MARKERS: [(&str, Marker); 5] = [
        (REF_OPEN, Marker::RefOpen),
        (REF_CLOSE, Marker::RefClose),
        (DET_OPEN, Marker::DetOpen),
        (DET_CLOSE, Marker::DetClose),
        (GROUNDING, Marker::Grounding),
    ];
    let mut tokens = Vec::new();
    let mut text_start = 0;
    let mut pos = 0;
    // Markers are ASCII and start with '<', so every index below is a char boundary.
    while let Some(found) = text[pos..].find("<|") {
        let at = pos + found;
        match MARKERS.iter().find(|(m, _)| text[at..].starts_with(m)) {
            Some(&(m, marker)) => {
                if at > text_start {
                    tokens.push(Token::Text(&text[text_start..at]));
                }
                tokens.push(Token::Marker(marker));
                pos = at + m.len();
                text_start = pos;
            }
            None => pos = at + 1,
        }
    }
    if text_start < text.len() {
        tokens.push(Token::Text(&text[text_start..]));
    }
    tokens
}

/// What the text is made of once the markers are paired up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part<'a> {
    /// Text outside any block.
    Text(&'a str),
    /// The phrase of a `<|ref|>` block (one part per text piece inside it).
    Ref(&'a str),
    /// The body of a `<|det|>` block, between its markers.
    Det(&'a str),
}

/// Pairs markers into blocks, tolerating stray closers and unclosed openers.
fn parse_parts(text: &str) -> Vec<Part<'_>> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum State {
        Outside,
        InRef,
        InDet,
    }
    // Only markers split text, so a block body is at most one text piece.
    fn end_block<'a>(parts: &mut Vec<Part<'a>>, state: State, body: &'a str, closed: bool) {
        match state {
            State::Outside => {}
            State::InRef => parts.push(Part::Ref(body)),
            State::InDet if closed => parts.push(Part::Det(body)),
            State::InDet => {
                let (det, rest) = split_unclosed_det(body);
                parts.push(Part::Det(det));
                if !rest.is_empty() {
                    parts.push(Part::Text(rest));
                }
            }
        }
    }
    let mut parts = Vec::new();
    let mut state = State::Outside;
    let mut body = "";
    for token in tokenize(text) {
        match token {
            Token::Text(s) if state == State::Outside => parts.push(Part::Text(s)),
            Token::Text(s) => body = s,
            Token::Marker(marker) => {
                // A block ends at its closer or, when that is missing, at any marker.
                let closed = matches!(
                    (state, marker),
                    (State::InRef, Marker::RefClose) | (State::InDet, Marker::DetClose)
                );
                end_block(&mut parts, state, body, closed);
                body = "";
                state = match marker {
                    Marker::RefOpen => State::InRef,
                    Marker::DetOpen => State::InDet,
                    Marker::RefClose | Marker::DetClose | Marker::Grounding => State::Outside,
                };
            }
        }
    }
    end_block(&mut parts, state, body, false);
    parts
}

/// Splits the body of a `<|det|>` that has no `<|/det|>` into the box list and the text
/// after it: the list ends where its outermost `[` closes; text that does not start
/// with `[` is not a box list at all. A list that never closes (output cut off) takes
/// the whole body.
fn split_unclosed_det(body: &str) -> (&str, &str) {
    let mut depth = 0usize;
    for (i, c) in body.char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return body.split_at(i + 1);
                }
            }
            c if depth == 0 && !c.is_whitespace() => return body.split_at(i),
            _ => {}
        }
    }
    (body, "")
}

/// The boxes in a `<|det|>` body: every innermost `[...]` group of exactly four numbers
/// (separated by commas and/or whitespace) closed by `]`; groups with other characters,
/// another count, or no `]` are skipped.
fn parse_boxes(body: &str) -> Vec<NormalizedBox> {
    let mut boxes = Vec::new();
    // Numbers of the open group, and whether it holds something that is not a number.
    let mut group: Option<(Vec<f64>, bool)> = None;
    let mut number = String::new();
    for c in body.chars() {
        let is_number_char = c.is_ascii_digit() || matches!(c, '-' | '+' | '.');
        if is_number_char {
            number.push(c);
            continue;
        }
        if let Some((values, garbled)) = group.as_mut() {
            finish_number(&mut number, values, garbled);
        }
        number.clear();
        match c {
            // A nested `[` starts over: only innermost groups count.
            '[' => group = Some((Vec::new(), false)),
            ']' => {
                if let Some((values, false)) = group.take()
                    && let Ok(v) = <[f64; 4]>::try_from(values)
                {
                    boxes.push(NormalizedBox::from_values(v));
                }
            }
            ',' => {}
            c if c.is_whitespace() => {}
            _ => {
                if let Some((_, garbled)) = group.as_mut() {
                    *garbled = true;
                }
            }
        }
    }
    boxes
}

/// Ends the number being read inside a group; an unreadable one garbles the group.
fn finish_number(number: &mut String, values: &mut Vec<f64>, garbled: &mut bool) {
    if number.is_empty() {
        return;
    }
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() => values.push(v),
        _ => *garbled = true,
    }
    number.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbox(x1: u32, y1: u32, x2: u32, y2: u32) -> NormalizedBox {
        NormalizedBox { x1, y1, x2, y2 }
    }

    fn grounding(label: &str, boxes: &[NormalizedBox]) -> Grounding {
        Grounding {
            label: label.to_string(),
            boxes: boxes.to_vec(),
        }
    }

    const CAPTION: &str = "<|grounding|>In the image, <|ref|>a man<|/ref|><|det|>[[10, 20, 300, 900]]<|/det|> \
        rides <|ref|>a horse<|/ref|><|det|>[[250, 400, 990, 999]]<|/det|> next to \
        <|ref|>two dogs<|/ref|><|det|>[[0, 700, 100, 999], [120, 710, 230, 980]]<|/det|>.";

    #[test]
    fn single_box() {
        let text = "<|ref|>The giraffe at the back<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![grounding(
                "The giraffe at the back",
                &[nbox(580, 270, 999, 900)]
            )]
        );
    }

    #[test]
    fn several_boxes_for_one_label() {
        let text = "<|ref|>cats<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8],[9,10,11,12]]<|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![grounding(
                "cats",
                &[nbox(1, 2, 3, 4), nbox(5, 6, 7, 8), nbox(9, 10, 11, 12)]
            )]
        );
    }

    #[test]
    fn grounded_caption_with_several_labels() {
        assert_eq!(
            parse_groundings(CAPTION),
            vec![
                grounding("a man", &[nbox(10, 20, 300, 900)]),
                grounding("a horse", &[nbox(250, 400, 990, 999)]),
                grounding(
                    "two dogs",
                    &[nbox(0, 700, 100, 999), nbox(120, 710, 230, 980)]
                ),
            ]
        );
        assert_eq!(
            plain_text(CAPTION),
            "In the image, a man rides a horse next to two dogs."
        );
    }

    #[test]
    fn plain_text_keeps_labels() {
        let text = "<|ref|>The cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> sleeps";
        assert_eq!(plain_text(text), "The cat sleeps");
        assert_eq!(
            plain_text("no markup <|User|> here"),
            "no markup <|User|> here"
        );
        assert_eq!(plain_text("a <|det|>[[1, 2, 3"), "a");
    }

    #[test]
    fn det_without_ref_has_empty_label() {
        let text = "Here: <|det|>[[5, 6, 7, 8]]<|/det|> and <|ref|>x<|/ref|><|det|>[[1,1,2,2]]<|/det|> \
            then <|det|>[[3, 3, 4, 4]]<|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![
                grounding("", &[nbox(5, 6, 7, 8)]),
                grounding("x", &[nbox(1, 1, 2, 2)]),
                grounding("", &[nbox(3, 3, 4, 4)]),
            ]
        );
    }

    #[test]
    fn truncated_mid_box_keeps_closed_boxes() {
        let text = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4], [12, 34, 5";
        assert_eq!(
            parse_groundings(text),
            vec![grounding("cat", &[nbox(1, 2, 3, 4)])]
        );
        assert!(parse_groundings("<|ref|>cat<|/ref|><|det|>[[12, 34, 5").is_empty());
        assert!(parse_groundings("<|ref|>cat<|/ref|><|det|>[[12, 34, 56, 78").is_empty());
        assert!(parse_groundings("<|ref|>ca").is_empty());
    }

    #[test]
    fn missing_det_close_ends_at_next_marker() {
        let text =
            "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]] and <|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]";
        assert_eq!(
            parse_groundings(text),
            vec![
                grounding("a", &[nbox(1, 2, 3, 4)]),
                grounding("b", &[nbox(5, 6, 7, 8)]),
            ]
        );
        assert_eq!(plain_text(text), "a and b");
        assert_eq!(plain_text("<|det|> hello"), "hello");
    }

    #[test]
    fn garbled_and_nested() {
        let text = "<|ref|>x<|/ref|><|det|>[[[1, 2, 3, 4]]], [1a, 2, 3, 4], [1, 2, 3], \
            [1, 2, 3, 4, 5], [1 2 3 4], [1, [2, 3], 4], [1.-2, 3, 4, 5], [5.9, 6, 7, 8]]]]<|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![grounding(
                "x",
                &[nbox(1, 2, 3, 4), nbox(1, 2, 3, 4), nbox(5, 6, 7, 8)]
            )]
        );
        assert!(parse_groundings("<|det|>[[a, b, c, d]]<|/det|>").is_empty());
        assert!(parse_groundings("<|det|>1, 2, 3, 4<|/det|>").is_empty());
    }

    #[test]
    fn clamps_and_orders_corners() {
        let text = "<|det|>[[ -5 ,\n 1200,\t700 , 3 ], [900, 10, 100, 20]]<|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![grounding(
                "",
                &[nbox(0, 3, 700, 999), nbox(100, 10, 900, 20)]
            )]
        );
        let huge = "<|det|>[[99999999999999999999999, 0, 1, 1]]<|/det|>";
        assert_eq!(parse_groundings(huge)[0].boxes, vec![nbox(1, 0, 999, 1)]);
    }

    #[test]
    fn whitespace_in_label_and_between_markers() {
        let text = "<|ref|>  the dog \n<|/ref|>  <|det|>  [ [ 1 ,2,  3 , 4 ] ]  <|/det|>";
        assert_eq!(
            parse_groundings(text),
            vec![grounding("the dog", &[nbox(1, 2, 3, 4)])]
        );
    }

    #[test]
    fn pixels_use_999_and_truncate() {
        let b = nbox(500, 0, 999, 999);
        assert_eq!(
            b.to_pixels(640, 480),
            GroundedBox {
                x1: 320, // int(500 / 999 * 640) = int(320.32)
                y1: 0,
                x2: 640,
                y2: 480,
            }
        );
        // int(1 / 999 * 998) = 0: truncation, not rounding.
        assert_eq!(nbox(1, 998, 1, 998).to_pixels(998, 1000).x1, 0);
        assert_eq!(nbox(1, 998, 1, 998).to_pixels(998, 1000).y1, 998); // 998.998…
        // Same float order as Python: (x / 999) * w.
        for x in 0..=999u32 {
            for w in [1u32, 333, 640, 1024, 4001] {
                let expect = (f64::from(x) / 999.0 * f64::from(w)).trunc() as u32;
                assert_eq!(nbox(x, 0, x, 0).to_pixels(w, 1).x1, expect);
            }
        }
    }

    #[test]
    fn serializes() {
        let g = &parse_groundings(CAPTION)[0];
        let json = serde_json::to_value(g).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"label": "a man", "boxes": [{"x1": 10, "y1": 20, "x2": 300, "y2": 900}]})
        );
    }

    /// Every prefix of valid answers, random byte soup and unicode garbage: no panic,
    /// and every box returned is in range and ordered.
    #[test]
    fn never_panics() {
        let check = |s: &str| {
            for g in parse_groundings(s) {
                assert!(!g.boxes.is_empty());
                for b in g.boxes {
                    assert!(b.x1 <= b.x2 && b.y1 <= b.y2 && b.x2 <= 999 && b.y2 <= 999);
                    let p = b.to_pixels(7, 1_000_000);
                    assert!(p.x2 <= 7 && p.y2 <= 1_000_000);
                }
            }
            let _ = plain_text(s);
        };
        let valid = [
            CAPTION,
            "<|ref|>The giraffe at the back<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>",
            "<|ref|>猫 ✨<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|/det|>ünïcödé",
        ];
        for s in valid {
            for (i, _) in s.char_indices() {
                check(&s[..i]);
                check(&s[i..]);
            }
        }
        // A fixed LCG over an alphabet rich in markup pieces, then over raw bytes.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let pieces = [
            "<|ref|>",
            "<|/ref|>",
            "<|det|>",
            "<|/det|>",
            "<|grounding|>",
            "<|",
            "|>",
            "[",
            "]",
            "[[",
            "]]",
            ", ",
            "-",
            ".",
            "1",
            "999",
            "12345",
            " ",
            "\n",
            "cat",
            "é",
            "猫",
            "\u{0}",
        ];
        for _ in 0..2000 {
            let n = next() % 40;
            let s: String = (0..n).map(|_| pieces[next() % pieces.len()]).collect();
            check(&s);
            let bytes: Vec<u8> = (0..next() % 80).map(|_| next() as u8).collect();
            check(&String::from_utf8_lossy(&bytes));
        }
    }
}
