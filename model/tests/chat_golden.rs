//! Golden tests of the tokenizer and chat template against the reference processor's
//! outputs in `tests/fixtures` (written by `DeepseekVLV2Processor` on CPU; see the
//! fixtures' own `README.md`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use tessera_model::chat::{ChatTokenizer, EncodedPrompt, Message, SpecialTokens};
use tessera_model::image_tokens::Tiling;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn as_u32s(value: &Value) -> Vec<u32> {
    let items = value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {value}"));
    items
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

fn as_usize(value: &Value) -> usize {
    usize::try_from(
        value
            .as_u64()
            .unwrap_or_else(|| panic!("expected an integer, got {value}")),
    )
    .unwrap()
}

/// `[[a, b], ...]` as pairs.
fn pairs(value: &Value) -> Vec<(usize, usize)> {
    let items = value
        .as_array()
        .unwrap_or_else(|| panic!("expected pairs, got {value}"));
    items
        .iter()
        .map(|p| (as_usize(&p[0]), as_usize(&p[1])))
        .collect()
}

/// Asserts two id sequences are equal, naming the first mismatch.
fn assert_ids_eq(context: &str, got: &[u32], want: &[u32]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let window = |ids: &[u32]| ids[first.saturating_sub(3)..(first + 5).min(ids.len())].to_vec();
    panic!(
        "{context}: ids differ first at index {first} (got {:?}, want {:?}); lengths got {} want {}; \
         around it got {:?} want {:?}",
        got.get(first),
        want.get(first),
        got.len(),
        want.len(),
        window(got),
        window(want),
    );
}

/// The case's conversation and tilings (`images_spatial_crop` is `[width, height]` per image).
fn conversation_and_tilings(case: &Value) -> (Vec<Message>, Vec<Tiling>) {
    let messages: Vec<Message> =
        serde_json::from_value(case["conversation"].clone()).expect("conversation");
    let tilings = pairs(&case["images_spatial_crop"])
        .into_iter()
        .map(|(w, h)| Tiling::new(w, h))
        .collect();
    (messages, tilings)
}

/// Checks an encoded conversation against `input_ids`, `images_seq_mask_ranges` and
/// `sft_format`, and returns it.
fn check_prompt(tok: &ChatTokenizer, name: &str, case: &Value) -> EncodedPrompt {
    let (messages, tilings) = conversation_and_tilings(case);
    let prompt = tok
        .encode_conversation(&messages, &tilings)
        .unwrap_or_else(|e| panic!("{name}: encode_conversation failed: {e}"));
    assert_ids_eq(
        &format!("{name}: input_ids"),
        &prompt.input_ids,
        &as_u32s(&case["input_ids"]),
    );
    let runs: Vec<(usize, usize)> = prompt.image_runs.iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(
        runs,
        pairs(&case["images_seq_mask_ranges"]),
        "{name}: image runs"
    );
    let want_counts: Vec<usize> = tilings.iter().map(|t| t.num_tokens()).collect();
    assert_eq!(
        prompt.num_image_tokens, want_counts,
        "{name}: image tokens per tiling"
    );
    let mask = prompt.images_seq_mask();
    assert_eq!(mask.len(), prompt.input_ids.len(), "{name}: mask length");
    let image_id = tok.special().image;
    for (i, (&is_image, &id)) in mask.iter().zip(&prompt.input_ids).enumerate() {
        assert_eq!(is_image, id == image_id, "{name}: images_seq_mask at {i}");
    }
    if let Some(sft) = case["sft_format"].as_str() {
        assert_eq!(tok.sft_format(&messages), sft, "{name}: sft_format");
    }
    prompt
}

/// Checks `special_token_ids` (token string → id) and the named ids of a cases file.
fn check_special_tokens(tok: &ChatTokenizer, cases: &Value) {
    let s: &SpecialTokens = tok.special();
    let by_name = [
        ("<image>", s.image),
        ("<|ref|>", s.ref_start),
        ("<|/ref|>", s.ref_end),
        ("<|det|>", s.det_start),
        ("<|/det|>", s.det_end),
        ("<|grounding|>", s.grounding),
        ("<|User|>", s.user),
        ("<|Assistant|>", s.assistant),
        ("<｜▁pad▁｜>", s.pad),
        ("<｜begin▁of▁sentence｜>", s.bos),
        ("<｜end▁of▁sentence｜>", s.eos),
    ];
    let expected = cases["special_token_ids"]
        .as_object()
        .expect("special_token_ids");
    for (token, id) in expected {
        let id = u32::try_from(id.as_u64().expect("id")).unwrap();
        assert_eq!(tok.token_to_id(token), Some(id), "token_to_id({token})");
        if let Some((_, field)) = by_name.iter().find(|(name, _)| name == token) {
            assert_eq!(*field, id, "special() id of {token}");
        }
    }
    let named = [
        ("bos_token_id", s.bos),
        ("eos_token_id", s.eos),
        ("pad_token_id", s.pad),
        ("image_token_id", s.image),
    ];
    for (key, got) in named {
        assert_eq!(u64::from(got), cases[key].as_u64().expect(key), "{key}");
    }
}

/// Every case of a fixture: special ids, tokenizer calls, input ids, image runs, display string.
fn check_fixture(name: &str) {
    let dir = fixture(name);
    let tok = ChatTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = read_json(&dir.join("cases.json"));
    check_special_tokens(&tok, &cases);
    let list = cases["cases"].as_array().expect("cases");
    assert!(!list.is_empty(), "{name}: no cases");
    for case in list {
        let case_name = format!("{name}/{}", case["name"].as_str().expect("case name"));
        for call in case["tokenizer_calls"].as_array().expect("tokenizer_calls") {
            let text = call["text"].as_str().expect("text");
            let ids = tok.encode(text).unwrap();
            assert_ids_eq(
                &format!("{case_name}: encode({text:?})"),
                &ids,
                &as_u32s(&call["ids"]),
            );
        }
        let prompt = check_prompt(&tok, &case_name, case);
        let counts: Vec<usize> = case["num_image_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(as_usize)
            .collect();
        assert_eq!(
            prompt.num_image_tokens, counts,
            "{case_name}: num_image_tokens"
        );
        assert_eq!(
            prompt.input_ids.len(),
            as_usize(&case["seq_len"]),
            "{case_name}: seq_len"
        );
    }
}

#[test]
fn tiny_fixture_prompts_match_the_reference() {
    check_fixture("tiny-mha-softmax");
}

#[test]
fn small_fixture_prompts_match_the_reference() {
    check_fixture("small-mla-softmax");
}

/// The conversation files for the CLI hold exactly each case's conversation, with image
/// paths relative to the `conversations/` folder.
#[test]
fn conversation_files_match_the_cases() {
    for name in ["tiny-mha-softmax", "small-mla-softmax"] {
        let dir = fixture(name);
        let cases = read_json(&dir.join("cases.json"));
        for case in cases["cases"].as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let path = dir.join("conversations").join(format!("{case_name}.json"));
            let from_file: Vec<Message> =
                serde_json::from_value(read_json(&path)).expect("conversation file");
            let (mut want, _) = conversation_and_tilings(case);
            for message in &mut want {
                for image in &mut message.images {
                    *image = format!("../{image}");
                }
            }
            assert_eq!(from_file, want, "{}", path.display());
            for image in from_file.iter().flat_map(|m| &m.images) {
                assert!(
                    path.parent().unwrap().join(image).is_file(),
                    "{}: missing image {image}",
                    path.display()
                );
            }
        }
    }
}

fn real_tokenizer() -> &'static ChatTokenizer {
    static TOKENIZER: OnceLock<ChatTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        ChatTokenizer::from_dir(&fixture("tiny-mha-softmax/real-tokenizer"))
            .expect("real tokenizer")
    })
}

fn real_cases() -> Value {
    read_json(&fixture("tiny-mha-softmax/real-tokenizer/cases.json"))
}

#[test]
fn real_tokenizer_encodes_and_decodes_like_the_reference() {
    let tok = real_tokenizer();
    let cases = real_cases();
    let entries = cases["encode_add_special_tokens_false"]
        .as_array()
        .expect("entries");
    assert!(!entries.is_empty());
    for entry in entries {
        let text = entry["text"].as_str().unwrap();
        let want = as_u32s(&entry["ids"]);
        assert_ids_eq(
            &format!("encode({text:?})"),
            &tok.encode(text).unwrap(),
            &want,
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            entry["decode"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}

#[test]
fn real_tokenizer_processor_cases_match_the_reference() {
    let tok = real_tokenizer();
    let cases = real_cases();
    let list = cases["processor_cases"]
        .as_array()
        .expect("processor_cases");
    assert!(!list.is_empty());
    for case in list {
        let name = format!("real-tokenizer/{}", case["name"].as_str().unwrap());
        for image in case["image_files_from_parent_folder"].as_array().unwrap() {
            let path = fixture("tiny-mha-softmax").join(image.as_str().unwrap());
            assert!(path.is_file(), "{name}: missing image {}", path.display());
        }
        check_prompt(tok, &name, case);
    }
}

#[test]
fn real_tokenizer_special_tokens_and_size() {
    let tok = real_tokenizer();
    let cases = real_cases();
    check_special_tokens(tok, &cases);
    assert_eq!(tok.vocab_size(), as_usize(&cases["len_after_processor"]));
    assert_eq!(tok.vocab_size(), 128_823);
    // DeepSeek-V3's full-width chat tokens are different tokens from the VL2 roles.
    assert_ne!(tok.token_to_id("<｜User｜>"), Some(tok.special().user));
}

/// No text of `b` bytes encodes to fewer than `b / max_bytes_per_token()` tokens: runs
/// of the vocabulary's longest entries, whitespace, digits, CJK, emoji and mixed text.
#[test]
fn no_token_covers_more_bytes_than_the_bound() {
    for name in ["tiny-mha-softmax", "small-mla-softmax"] {
        let tok = ChatTokenizer::from_dir(&fixture(name)).unwrap();
        let bound = tok.max_bytes_per_token();
        let vocab = tok.tokenizer().get_vocab(true);
        let mut longest: Vec<&String> = vocab.keys().collect();
        longest.sort_by_key(|k| std::cmp::Reverse(k.len()));
        let decoded: Vec<String> = longest[..20]
            .iter()
            .map(|k| tok.decode(&[vocab[*k]], false).unwrap())
            .collect();
        let mut texts = vec![
            " ".repeat(5000),
            "\n".repeat(3000),
            "1234567890".repeat(300),
            "中文字符".repeat(500),
            "🙂".repeat(700),
            "The quick brown fox jumps over the lazy dog. ".repeat(100),
            "<｜begin▁of▁sentence｜>".repeat(200),
        ];
        texts.extend(decoded.iter().map(|d| d.repeat(100)));
        texts.push(decoded.concat().repeat(20));
        for text in &texts {
            let tokens = tok.encode(text).unwrap().len();
            assert!(
                tokens * bound >= text.len(),
                "{name}: {} bytes in {tokens} tokens, more than {bound} bytes a token",
                text.len()
            );
        }
    }
}
