//! Fuzzing on stable Rust: every parser that takes a client's bytes, driven for a fixed
//! time per target with inputs mutated from a committed seed corpus
//! (`tests/fuzz/<target>/`), in the manner of AFL's and libFuzzer's "havoc" stage
//! (bit flips, interesting values, inserted, deleted, duplicated and spliced byte
//! runs, stacked several at a time). It has no coverage feedback, so it finds what
//! random mutation of good inputs finds; the seeds carry it past the formats' magic
//! numbers and checksums. Any panic fails the test, with the input saved under
//! `target/tmp/fuzz-failures/` and the seed to replay it.
//!
//! The targets: image headers, decoding and the processor; conversations through the
//! chat template and the tokenizer; the grounding parser; OpenAI request parsing
//! through the gateway's checks; the public `GenerateRequest` protobuf through the same
//! checks; the internal tensor codec.
//!
//! `TESSERA_FUZZ_SECONDS` sets each target's time (default 4; CI uses the default),
//! `TESSERA_FUZZ_SEED` the first random seed (default: from the clock, printed).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::Device;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_gateway::openai::ChatRequest;
use tessera_gateway::{Limits, RemoteImages};
use tessera_model::chat::{ChatTokenizer, Message, Role};
use tessera_model::config::ProcessorConfig;
use tessera_model::image_tokens::Tiling;
use tessera_model::processor::{self, ImageLimits};

#[allow(dead_code)]
mod common;

/// Longest input a mutation may produce.
const MAX_LEN: usize = 256 << 10;

/// What the targets share: the tiny fixture's tokenizer and processor settings.
struct Model {
    tokenizer: ChatTokenizer,
    processor: ProcessorConfig,
    limits: Limits,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = common::fixture_dir("tiny-mha-softmax");
        let tokenizer = ChatTokenizer::from_dir(&dir).unwrap();
        let limits = Limits {
            // A client's text beyond what the positions hold is refused before the
            // tokenizer, as the gateway does.
            max_text_bytes: 4096 * tokenizer.max_bytes_per_token(),
            // Keep each decode small enough for many runs a second.
            max_image_pixels: 1 << 20,
            ..Limits::default()
        };
        Model {
            processor: ProcessorConfig::from_dir(&dir).unwrap(),
            tokenizer,
            limits,
        }
    })
}

/// An image as a client sends it: its header is read, then it is decoded within the
/// pixel limit and tiled and normalised by the processor.
fn image(data: &[u8]) {
    let m = model();
    let Ok(_header) = processor::read_header(data) else {
        return;
    };
    let limits = ImageLimits {
        max_pixels: m.limits.max_image_pixels,
    };
    if let Ok(img) = processor::decode_image(data, &limits) {
        let cropping = data.len() % 2 == 0;
        let _ = processor::process_image(&img, &m.processor, cropping);
    }
}

/// A conversation: messages split at NUL bytes, the first byte of each naming its
/// role; each `<image>` tag gets a tiling from the bytes. Encoded with the chat
/// template, then the ids decoded back.
fn conversation(data: &[u8]) {
    let m = model();
    if data.len() > m.limits.max_text_bytes {
        return;
    }
    let mut messages = Vec::new();
    let mut tilings = Vec::new();
    for part in data.split(|&b| b == 0) {
        let Some((&first, text)) = part.split_first() else {
            continue;
        };
        let role = [Role::System, Role::User, Role::Assistant][usize::from(first % 3)];
        let content = String::from_utf8_lossy(text).into_owned();
        for _ in content.matches(m.tokenizer.image_token()) {
            tilings.push(Tiling::new(
                1 + usize::from(first % 3),
                1 + usize::from(first / 86),
            ));
        }
        messages.push(Message::new(role, content));
    }
    if let Ok(prompt) = m.tokenizer.encode_conversation(&messages, &tilings) {
        let _ = m.tokenizer.decode(&prompt.input_ids, false);
    }
    // Any ids a client's tokens could name, decoded.
    let ids: Vec<u32> = data
        .chunks(3)
        .map(|c| c.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)) % 140_000)
        .collect();
    let _ = m.tokenizer.decode(&ids, true);
}

/// The grounding markup parser, on any text.
fn grounding(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = tessera_model::grounding::parse_groundings(&text);
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

/// An OpenAI chat completion body, through parsing, conversion (data: URIs only) and
/// the gateway's request checks.
fn openai(data: &[u8]) {
    let Ok(chat) = ChatRequest::parse(data) else {
        return;
    };
    let remote = RemoteImages::disabled();
    let Ok(request) = runtime().block_on(chat.into_generate(&remote)) else {
        return;
    };
    checked(request);
}

/// The gateway's checks of a request, and the chat template on what passes them.
fn checked(request: tessera_proto::v1::GenerateRequest) {
    let m = model();
    let image_token = m.tokenizer.image_token();
    if let Ok(checked) = tessera_gateway::request::check(request, &m.limits, image_token) {
        let tilings = vec![Tiling::new(1, 1); checked.images.len()];
        let _ = m.tokenizer.encode_conversation(&checked.messages, &tilings);
    }
}

/// A public `GenerateRequest` as protobuf bytes, through the same checks.
fn generate_request(data: &[u8]) {
    if let Ok(request) = tessera_proto::v1::GenerateRequest::decode(data) {
        checked(request);
    }
}

/// The internal tensor codec: a `Tensor` message decoded from protobuf bytes, then
/// onto the CPU.
fn tensor(data: &[u8]) {
    if let Ok(t) = tessera_proto::internal::v1::Tensor::decode(data) {
        // Bound what a decoded shape may allocate, as a member's message limit does.
        if t.data.len() <= MAX_LEN {
            let _ = tessera_proto::tensor::decode(&t, &Device::Cpu);
        }
    }
}

/// The seed corpus of `target`: every file of `tests/fuzz/<target>/`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the seed corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Values that often sit on a boundary.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    u64::MAX,
];

/// One havoc round: 1 to 8 stacked mutations of `input`.
fn mutate(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let len = data.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] = rng.random();
            }
            2 if len > 0 => {
                // An interesting value, 1 to 8 bytes wide, in either byte order.
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.random_range(0..4)].min(len);
                let bytes = if rng.random() {
                    value.to_le_bytes()
                } else {
                    value.to_be_bytes()
                };
                let i = rng.random_range(0..=len - width);
                data[i..i + width].copy_from_slice(&bytes[..width]);
            }
            3 => {
                let n = rng.random_range(1..=64);
                let at = rng.random_range(0..=len);
                let random: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, random);
            }
            4 if len > 0 => {
                let at = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - at).min(256));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                // Duplicate a run somewhere else.
                let at = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - at).min(256));
                let run = data[at..at + n].to_vec();
                let to = rng.random_range(0..=len);
                data.splice(to..to, run);
            }
            6 => {
                // Splice in a run of another seed.
                let other = &corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let at = rng.random_range(0..other.len());
                    let n = rng.random_range(1..=(other.len() - at).min(512));
                    let to = rng.random_range(0..=len);
                    data.splice(to..to, other[at..at + n].iter().copied());
                }
            }
            7 if len > 0 => data.truncate(rng.random_range(0..len)),
            8 if len > 0 => {
                // Overwrite with a byte that is special in text formats.
                let i = rng.random_range(0..len);
                data[i] = b"\0\"\\{}[]<>|:,0-9\n\xc3\xe2\xff"[rng.random_range(0..19)];
            }
            _ => {}
        }
    }
    data.truncate(MAX_LEN);
    data
}

fn budget() -> Duration {
    let seconds = std::env::var("TESSERA_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    Duration::from_secs_f64(seconds)
}

/// Runs `run` on every seed of `target`, then on mutated seeds until the budget is
/// spent; a panic saves the input and fails.
fn fuzz(target: &str, run: fn(&[u8])) {
    let corpus = seeds(target);
    let seed = std::env::var("TESSERA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = StdRng::seed_from_u64(seed);
    let attempt = |input: &[u8], what: &str| {
        if let Err(panic) = std::panic::catch_unwind(|| run(input)) {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{target}-{seed}"));
            std::fs::write(&path, input).unwrap();
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "{target}: {what} panicked ({message}); input saved to {} \
                 (TESSERA_FUZZ_SEED={seed})",
                path.display()
            );
        }
    };
    for (i, input) in corpus.iter().enumerate() {
        attempt(input, &format!("seed {i}"));
    }
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        attempt(&input, "a mutated input");
        runs += 1;
    }
    println!(
        "{target}: {} seeds, {runs} mutated inputs in {:?}, no panic (TESSERA_FUZZ_SEED={seed})",
        corpus.len(),
        budget()
    );
}

#[test]
fn fuzz_images() {
    fuzz("image", image);
}

#[test]
fn fuzz_conversations() {
    fuzz("conversation", conversation);
}

#[test]
fn fuzz_groundings() {
    fuzz("grounding", grounding);
}

#[test]
fn fuzz_openai_requests() {
    fuzz("openai", openai);
}

#[test]
fn fuzz_generate_requests() {
    fuzz("generate_request", generate_request);
}

#[test]
fn fuzz_tensors() {
    fuzz("tensor", tensor);
}
