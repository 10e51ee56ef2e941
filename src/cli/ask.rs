//! `tessera ask`: a client of the public API. Its flags and `--json` output follow
//! `tessera generate`'s, so the same question can be put to a cluster and to the
//! offline path and the answers compared.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tessera_model::chat::{Message, Role};
use tessera_model::draw::{draw_groundings, save_png};
use tessera_model::grounding::{GroundedBox, parse_groundings};
use tessera_model::image_tokens::Tiling;
use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits, load_image};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{self, FinishReason, GenerateRequest, part};
use tokio_stream::StreamExt;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_flag", "conversation"])))]
pub struct AskArgs {
    /// The gateway's gRPC address.
    #[arg(long, env = "TESSERA_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// A single user message.
    prompt: Option<String>,
    /// The same as the positional PROMPT (as in `tessera generate`).
    #[arg(long = "prompt", conflicts_with = "prompt")]
    prompt_flag: Option<String>,
    /// A JSON array of messages ({"role", "content", "images"?}), as for `tessera generate`;
    /// image paths are relative to the file's folder unless absolute.
    #[arg(long)]
    conversation: Option<PathBuf>,
    /// An image for the prompt (repeatable, in order). A prompt without `<image>` tags
    /// gets one `<image>` line per image in front of the text.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Draw the answer's grounding boxes over the last image and save it as PNG.
    #[arg(long)]
    draw_boxes: Option<PathBuf>,
    /// Most tokens to generate [default: the server's].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Keep generating after the end-of-sentence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Penalise tokens already in the prompt or output (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling; the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Id for the server's logs [default: server-chosen].
    #[arg(long)]
    request_id: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// The CA that signed the gateway's certificate, for a gateway serving TLS
    /// (`--tls-cert`): connects with https and checks the certificate against
    /// --tls-server-name.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name the gateway's certificate carries (with --tls-ca).
    #[arg(long, default_value = tessera_runtime::tls::DEFAULT_SERVER_NAME)]
    tls_server_name: String,
    /// API key for a server started with `--api-key-file` (sent as
    /// `authorization: Bearer KEY`).
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print one JSON object (ids, text, finish reason, images, groundings, usage,
    /// timings) instead of streaming the text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ImageReport {
    tiling: Tiling,
    tokens: u32,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct GroundingReport {
    label: String,
    boxes: Vec<GroundedBox>,
}

#[derive(Serialize)]
struct UsageReport {
    prompt_tokens: u32,
    image_tokens: u32,
    completion_tokens: u32,
}

#[derive(Serialize)]
struct TimingReport {
    first_token_s: f64,
    total_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    request_id: String,
    output_ids: Vec<u32>,
    text: String,
    finish_reason: &'static str,
    images: Vec<ImageReport>,
    groundings: Vec<GroundingReport>,
    usage: UsageReport,
    timings: TimingReport,
}

/// The conversation and the image files in the order their `<image>` tags appear.
fn conversation(args: &AskArgs) -> anyhow::Result<(Vec<Message>, Vec<PathBuf>)> {
    if let Some(path) = &args.conversation {
        if !args.image.is_empty() {
            bail!("--image goes with a prompt; a conversation file names its own images");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read conversation file {}", path.display()))?;
        let mut messages: Vec<Message> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of messages", path.display()))?;
        // A trailing empty assistant turn only marks where the answer goes.
        if messages.last().is_some_and(|m| {
            m.role == Role::Assistant && m.content.is_empty() && m.images.is_empty()
        }) {
            messages.pop();
        }
        if messages.is_empty() {
            bail!("{} holds no messages", path.display());
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let images = messages
            .iter()
            .flat_map(|m| &m.images)
            .map(|f| base.join(f))
            .collect();
        return Ok((messages, images));
    }
    let prompt = args
        .prompt
        .clone()
        .or_else(|| args.prompt_flag.clone())
        .unwrap_or_default();
    let text = if args.image.is_empty() || prompt.contains("<image>") {
        prompt
    } else {
        format!("{}{prompt}", "<image>\n".repeat(args.image.len()))
    };
    Ok((vec![Message::new(Role::User, text)], args.image.clone()))
}

/// A message as API parts: text pieces with the images where their tags stand.
pub(super) fn to_parts(
    content: &str,
    images: &mut impl Iterator<Item = (Vec<u8>, String)>,
) -> anyhow::Result<Vec<v1::Part>> {
    let mut parts = Vec::new();
    let mut pieces = content.split("<image>").peekable();
    while let Some(text) = pieces.next() {
        if !text.is_empty() {
            parts.push(v1::Part {
                kind: Some(part::Kind::Text(text.to_string())),
            });
        }
        if pieces.peek().is_some() {
            let (data, mime_type) = images
                .next()
                .context("the conversation has more <image> tags than images")?;
            parts.push(v1::Part {
                kind: Some(part::Kind::Image(v1::Image {
                    data: data.into(),
                    mime_type,
                })),
            });
        }
    }
    Ok(parts)
}

pub(super) fn mime_of(path: &Path) -> String {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        _ => "",
    }
    .to_string()
}

fn request(
    args: &AskArgs,
    messages: &[Message],
    images: &[PathBuf],
) -> anyhow::Result<GenerateRequest> {
    let files = images
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|data| (data, mime_of(p)))
                .with_context(|| format!("cannot read image {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut files = files.into_iter();
    let mut out = Vec::new();
    for m in messages {
        let role = match m.role {
            Role::System => v1::Role::System,
            Role::User => v1::Role::User,
            Role::Assistant => v1::Role::Assistant,
        };
        out.push(v1::Message {
            role: role as i32,
            parts: to_parts(&m.content, &mut files)?,
        });
    }
    if files.next().is_some() {
        bail!("there are more images than <image> tags in the conversation");
    }
    Ok(GenerateRequest {
        request_id: args.request_id.clone().unwrap_or_default(),
        messages: out,
        sampling: Some(v1::SamplingParams {
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            top_k: Some(args.top_k),
            repetition_penalty: Some(args.repetition_penalty),
            seed: Some(args.seed),
            ..Default::default()
        }),
        stopping: Some(v1::StoppingParams {
            max_tokens: args.max_tokens,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
        }),
    })
}

fn reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Unspecified => "unspecified",
    }
}

pub async fn run(args: AskArgs) -> anyhow::Result<()> {
    let (messages, image_paths) = conversation(&args)?;
    if args.draw_boxes.is_some() && image_paths.is_empty() {
        bail!("--draw-boxes needs an image to draw on");
    }
    let req = request(&args, &messages, &image_paths)?;
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("{scheme}://{}", args.addr)
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
        .with_context(|| format!("invalid --addr {addr}"))?;
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            .domain_name(args.tls_server_name.clone());
        endpoint = endpoint.tls_config(config).context("TLS to the gateway")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout_seconds))
        .connect()
        .await
        .with_context(|| format!("cannot reach Tessera at {addr} (is `tessera up` running?)"))?;
    let mut client = TesseraClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let mut req = tonic::Request::new(req);
    if let Some(key) = &args.api_key {
        let value = format!("Bearer {key}")
            .parse()
            .context("--api-key must be printable ASCII")?;
        req.metadata_mut().insert("authorization", value);
    }
    let started = Instant::now();
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let (mut text, mut ids, mut first_token) = (String::new(), Vec::new(), None);
    let mut request_id = String::new();
    let mut finished = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        request_id = msg.request_id;
        match msg.event {
            Some(Event::Delta(d)) => {
                if first_token.is_none() && !d.token_ids.is_empty() {
                    first_token = Some(started.elapsed());
                }
                if !args.json {
                    use std::io::Write;
                    print!("{}", d.text);
                    std::io::stdout().flush().ok();
                }
                text.push_str(&d.text);
                ids.extend(d.token_ids);
            }
            Some(Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let total = started.elapsed();
    let finished = finished.context("the stream ended without its `finished` message")?;
    let usage = finished.usage.unwrap_or_default();
    let first = first_token.unwrap_or(total);
    let decode_tokens = ids.len().saturating_sub(1);
    let decode_s = (total - first).as_secs_f64();
    let timings = TimingReport {
        first_token_s: first.as_secs_f64(),
        total_s: total.as_secs_f64(),
        decode_tokens_per_s: if decode_s > 0.0 {
            decode_tokens as f64 / decode_s
        } else {
            0.0
        },
    };
    let reason = reason_name(finished.finish_reason());

    if let Some(path) = &args.draw_boxes {
        let last = image_paths.last().expect("checked above");
        let img = load_image(
            last,
            &ImageLimits {
                max_pixels: DEFAULT_MAX_PIXELS,
            },
        )?;
        save_png(&draw_groundings(&img, &parse_groundings(&text)), path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        let report = Report {
            request_id,
            output_ids: ids,
            text,
            finish_reason: reason,
            images: finished
                .images
                .iter()
                .map(|i| ImageReport {
                    tiling: Tiling::new(i.tiles_x as usize, i.tiles_y as usize),
                    tokens: i.tokens,
                    width: i.width,
                    height: i.height,
                })
                .collect(),
            groundings: finished
                .groundings
                .iter()
                .map(|g| GroundingReport {
                    label: g.label.clone(),
                    boxes: g
                        .boxes
                        .iter()
                        .map(|b| GroundedBox {
                            x1: b.x1,
                            y1: b.y1,
                            x2: b.x2,
                            y2: b.y2,
                        })
                        .collect(),
                })
                .collect(),
            usage: UsageReport {
                prompt_tokens: usage.prompt_tokens,
                image_tokens: usage.image_tokens,
                completion_tokens: usage.completion_tokens,
            },
            timings,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens ({} image), {} generated, finish: {reason}; first token {:.2}s, decode {:.1} tok/s]",
            usage.prompt_tokens,
            usage.image_tokens,
            usage.completion_tokens,
            timings.first_token_s,
            timings.decode_tokens_per_s
        );
    }
    Ok(())
}
