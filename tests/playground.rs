//! The web playground in a real browser: Debian's Chromium, headless, driven over
//! WebDriver by chromedriver, against a real `tessera up --http` on the tiny fixture.
//! One test streams an answer through the page and checks it is the API's answer;
//! one feeds the page a recorded grounding response and measures where the boxes are
//! drawn over the image; one checks the grounding prompt the page builds and that a
//! refused request shows the API's error.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian/Ubuntu:
//! `apt-get install -y chromium chromium-driver`, or `tools/install-test-deps`);
//! `TESSERA_CHROMIUM` and `TESSERA_CHROMEDRIVER` name other paths. Each test saves a
//! screenshot under `target/playground/` and prints its path.

#[allow(dead_code)] // this test uses start_with only
#[path = "common/up.rs"]
mod up;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

const MODEL: &str = "tiny-mha-softmax";
const IMAGE: &str = "img_640x480.png";
const RECORDED: &str = "tests/fixtures/playground/grounding_response.json";
/// How long the page may take to reach a state (an answer, drawn boxes).
const DEADLINE: Duration = Duration::from_secs(120);
/// How long chromedriver may take to print its port.
const DRIVER_START: Duration = Duration::from_secs(30);
/// Largest distance, in CSS pixels, between a drawn box edge and where it belongs.
const TOLERANCE: f64 = 1.5;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A browser-test prerequisite: `$var`, or `default`; a missing one fails the test
/// with how to install it.
fn prerequisite(var: &str, default: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{what} is not installed at {}: the playground's browser tests need Chromium and \
         ChromeDriver. On Debian/Ubuntu: `apt-get install -y chromium chromium-driver` (or \
         run tools/install-test-deps); elsewhere set {var} to the binary's path.",
        path.display()
    );
    path
}

/// A chromedriver child process in its own process group; dropping it ends the
/// group, browsers included.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let binary = prerequisite(
            "TESSERA_CHROMEDRIVER",
            "/usr/bin/chromedriver",
            "ChromeDriver",
        );
        let mut child = Command::new(&binary)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // "ChromeDriver was started successfully on port 41234."
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(rest.trim_end_matches('.').to_owned());
                }
            }
        });
        let mut driver = Self {
            child,
            url: String::new(),
        };
        let port = rx.recv_timeout(DRIVER_START).unwrap_or_else(|_| {
            panic!(
                "chromedriver did not report its port within {DRIVER_START:?} (exit: {:?})",
                driver.child.try_wait()
            )
        });
        driver.url = format!("http://127.0.0.1:{port}");
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is the driver's pid; Chromium runs in the same group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page at `tessera up`'s HTTP address in a fresh headless Chromium.
struct Playground {
    client: Client,
    http: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
    _up: up::Up,
}

impl Playground {
    async fn open() -> Self {
        Self::open_with(&[], None).await
    }

    /// The page of a `tessera up` started with `extra` arguments; with `key`, answers
    /// the page's prompt for an API key with it.
    async fn open_with(extra: &[&str], key: Option<&str>) -> Self {
        let driver = Driver::start();
        let chromium = prerequisite("TESSERA_CHROMIUM", "/usr/bin/chromium", "Chromium");
        let model = manifest_dir().join("tests/fixtures").join(MODEL);
        let (up, addrs) = up::start_with(
            Command::new(env!("CARGO_BIN_EXE_tessera")),
            model.to_str().unwrap(),
            "2",
            &[
                &["--http", "127.0.0.1:0", "--kv-cache-bytes", "67108864"],
                extra,
            ]
            .concat(),
        );
        let http = addrs.http.expect("tessera up printed its HTTP address");
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            // A prompt stays open until the test answers it.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver cannot start Chromium: {e}"));
        client.goto(&format!("http://{http}/")).await.unwrap();
        if let Some(key) = key {
            // The page asks for the served model at once, gets 401 and prompts.
            let deadline = std::time::Instant::now() + DEADLINE;
            let text = loop {
                if let Ok(text) = client.get_alert_text().await {
                    break text;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the page never asked for an API key"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(text.contains("API key"), "{text}");
            client.send_alert_text(key).await.unwrap();
            client.accept_alert().await.unwrap();
        }
        let page = Self {
            client,
            http,
            _driver: driver,
            _profile: profile,
            _up: up,
        };
        // The page names the served model once it has asked for it.
        page.wait_for(&format!("#model[data-id='{MODEL}']")).await;
        page
    }

    /// Waits until `selector` matches; on timeout saves a screenshot and fails
    /// with the page's error line.
    async fn wait_for(&self, selector: &str) {
        let found = self
            .client
            .wait()
            .at_most(DEADLINE)
            .for_element(Locator::Css(selector))
            .await;
        if let Err(e) = found {
            let shot = self.screenshot("timeout").await;
            let error = self
                .js("return document.getElementById('error').textContent")
                .await;
            panic!("{selector} did not appear ({e}); page error: {error}; see {shot}");
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, Vec::new()).await.unwrap()
    }

    async fn find(&self, id: &str) -> fantoccini::elements::Element {
        self.client.find(Locator::Id(id)).await.unwrap()
    }

    /// Picks the fixture image with the page's file input.
    async fn attach_image(&self) {
        let path = manifest_dir()
            .join("tests/fixtures")
            .join(MODEL)
            .join(IMAGE);
        let input = self.find("images").await;
        input.send_keys(path.to_str().unwrap()).await.unwrap();
        self.wait_for(".thumb.target").await;
    }

    /// Saves a screenshot as `target/playground/<name>.png` and prints its path
    /// (past the test harness's capture, so CI logs show it).
    async fn screenshot(&self, name: &str) -> String {
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| manifest_dir().join("target"), PathBuf::from);
        let dir = manifest_dir().join(dir).join("playground");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(&path, png).unwrap();
        let line = format!("screenshot: {}\n", path.display());
        let _ = std::io::stderr().write_all(line.as_bytes());
        path.display().to_string()
    }

    async fn close(self) {
        self.client.clone().close().await.unwrap();
    }
}

/// On a server started with API keys the page asks for a key at its first 401, sends
/// it from then on, and the answer streams in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_page_asks_for_a_key_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "page-key-0123456789\n").unwrap();
    let page = Playground::open_with(
        &["--api-key-file", keys.to_str().unwrap()],
        Some("page-key-0123456789"),
    )
    .await;
    page.find("question")
        .await
        .send_keys("Hello there.")
        .await
        .unwrap();
    let max_tokens = page.find("max-tokens").await;
    max_tokens.clear().await.unwrap();
    max_tokens.send_keys("4").await.unwrap();
    page.find("send").await.click().await.unwrap();
    page.wait_for("#status[data-state='done'], #status[data-state='error']")
        .await;
    page.screenshot("api_key_answer").await;
    let seen = page
        .js("return {
               state: document.getElementById('status').dataset.state,
               error: document.getElementById('error').textContent,
               completion: document.getElementById('usage').dataset.completionTokens,
             };")
        .await;
    assert_eq!(seen["state"], "done", "the page failed: {}", seen["error"]);
    assert_eq!(seen["completion"], "4", "{seen}");
    page.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_streams_into_the_page_as_the_api_answers_it() {
    let page = Playground::open().await;
    page.attach_image().await;
    let question = "Describe this image.";
    page.find("question")
        .await
        .send_keys(question)
        .await
        .unwrap();
    let max_tokens = page.find("max-tokens").await;
    max_tokens.clear().await.unwrap();
    max_tokens.send_keys("8").await.unwrap();
    page.find("temperature").await.send_keys("0").await.unwrap();
    page.find("send").await.click().await.unwrap();
    page.wait_for("#status[data-state='done'], #status[data-state='error']")
        .await;
    page.screenshot("streamed_answer").await;
    let seen = page
        .js("const p = window.tesseraPlayground;
             return {
               state: document.getElementById('status').dataset.state,
               error: document.getElementById('error').textContent,
               answer: document.getElementById('answer').textContent,
               finish: document.getElementById('finish').dataset.reason,
               completion: document.getElementById('usage').dataset.completionTokens,
               chunks: p.chunks,
               request: p.lastRequest,
             };")
        .await;
    assert_eq!(seen["state"], "done", "the page failed: {}", seen["error"]);

    // The page sent the image as a data: URI before the question, streamed.
    let png = STANDARD.encode(
        std::fs::read(
            manifest_dir()
                .join("tests/fixtures")
                .join(MODEL)
                .join(IMAGE),
        )
        .unwrap(),
    );
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
            {"type": "text", "text": "\n"},
            {"type": "text", "text": question},
        ]}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    assert_eq!(seen["request"], body, "the page's request");
    assert!(seen["chunks"].as_u64().unwrap() >= 1, "{seen}");

    // The same greedy request, whole, straight from the API: the page assembled
    // exactly its text from the stream.
    body["stream"] = json!(false);
    body.as_object_mut().unwrap().remove("stream_options");
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", page.http))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(DEADLINE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let whole: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let choice = &whole["choices"][0];
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "{whole}");
    assert_eq!(seen["answer"], text);
    assert_eq!(seen["finish"], choice["finish_reason"]);
    assert_eq!(
        seen["completion"],
        whole["usage"]["completion_tokens"].to_string()
    );
    page.close().await;
}

/// Each drawn box's rectangle relative to the displayed image, with its label, and
/// the image's displayed and natural sizes.
const GEOMETRY: &str = "
    const img = document.getElementById('preview').getBoundingClientRect();
    const preview = document.getElementById('preview');
    return {
      image: {width: img.width, height: img.height,
              natural_width: preview.naturalWidth, natural_height: preview.naturalHeight},
      boxes: Array.from(document.querySelectorAll('#boxes .box')).map((b) => {
        const r = b.getBoundingClientRect();
        const label = b.querySelector('.label');
        const l = label.getBoundingClientRect();
        return {label: b.dataset.label, text: label.textContent,
                label_shown: l.width > 0 && l.height > 0
                  && getComputedStyle(label).visibility === 'visible',
                x: r.left - img.left, y: r.top - img.top, width: r.width, height: r.height};
      }),
      legend: Array.from(document.querySelectorAll('#legend li')).map((li) => li.dataset.label),
    };";

/// Asserts the boxes are where `recorded`'s pixel boxes are, scaled from the
/// image's natural size to its displayed size; returns that scale.
fn assert_boxes_match(geometry: &Value, recorded: &Value) -> f64 {
    let image = &geometry["image"];
    let f = |v: &Value| v.as_f64().unwrap();
    assert_eq!(
        (f(&image["natural_width"]), f(&image["natural_height"])),
        (640.0, 480.0)
    );
    let (sx, sy) = (
        f(&image["width"]) / f(&image["natural_width"]),
        f(&image["height"]) / f(&image["natural_height"]),
    );
    let groundings = recorded["choices"][0]["message"]["groundings"]
        .as_array()
        .unwrap();
    let expected: Vec<(&str, &Value)> = groundings
        .iter()
        .flat_map(|g| {
            let label = g["label"].as_str().unwrap();
            g["boxes"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |b| (label, b))
        })
        .collect();
    let drawn = geometry["boxes"].as_array().unwrap();
    assert_eq!(drawn.len(), expected.len(), "{geometry}");
    for (got, (label, b)) in drawn.iter().zip(expected) {
        assert_eq!(got["label"], label);
        assert_eq!(got["text"], label, "the label is written on the box");
        assert_eq!(got["label_shown"], true, "{got}");
        let want = [
            f(&b["x1"]) * sx,
            f(&b["y1"]) * sy,
            (f(&b["x2"]) - f(&b["x1"])) * sx,
            (f(&b["y2"]) - f(&b["y1"])) * sy,
        ];
        let have = [
            f(&got["x"]),
            f(&got["y"]),
            f(&got["width"]),
            f(&got["height"]),
        ];
        for (h, w) in have.iter().zip(want) {
            assert!(
                (h - w).abs() <= TOLERANCE,
                "{label}: drawn at {have:?}, belongs at {want:?} (scale {sx}×{sy})"
            );
        }
    }
    let labels: Vec<&str> = groundings
        .iter()
        .map(|g| g["label"].as_str().unwrap())
        .collect();
    assert_eq!(geometry["legend"], json!(labels));
    sx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_grounding_answer_is_drawn_where_its_boxes_are() {
    let recorded: Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_dir().join(RECORDED)).unwrap())
            .unwrap();
    let page = Playground::open().await;
    page.attach_image().await;
    page.client
        .execute(
            "window.tesseraPlayground.showResponse(arguments[0])",
            vec![recorded.clone()],
        )
        .await
        .unwrap();
    page.wait_for("#boxes .box:nth-child(4)").await;
    page.screenshot("grounding_boxes").await;
    let answer = page
        .js("return document.getElementById('answer').textContent")
        .await;
    assert_eq!(answer, recorded["choices"][0]["message"]["content"]);
    assert_boxes_match(&page.js(GEOMETRY).await, &recorded);

    // In a narrow window the image is shown smaller and the boxes follow it.
    page.client.set_window_size(640, 560).await.unwrap();
    page.client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const check = () => innerWidth <= 640 ? done(innerWidth) : setTimeout(check, 20);
             check();",
            Vec::new(),
        )
        .await
        .unwrap();
    let scale = assert_boxes_match(&page.js(GEOMETRY).await, &recorded);
    assert!(
        scale < 0.95,
        "the narrow window shows the image at scale {scale}"
    );
    page.js("document.getElementById('stage').scrollIntoView(); return null")
        .await;
    page.screenshot("grounding_boxes_narrow").await;
    page.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grounding_question_on_a_refused_image_shows_the_api_error() {
    let page = Playground::open().await;
    // A picture the browser draws but the model's processor does not read.
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("square.svg");
    std::fs::write(
        &svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="40" height="30" fill="teal"/></svg>"#,
    )
    .unwrap();
    page.find("images")
        .await
        .send_keys(svg.to_str().unwrap())
        .await
        .unwrap();
    page.wait_for(".thumb.target").await;
    page.find("question")
        .await
        .send_keys("What is this?")
        .await
        .unwrap();
    page.find("grounding").await.click().await.unwrap();
    page.find("ref")
        .await
        .send_keys("the square")
        .await
        .unwrap();
    let prompt = "<|grounding|>What is this? <|ref|>the square<|/ref|>.";
    let preview = page
        .js("return document.getElementById('prompt-preview').textContent")
        .await;
    assert_eq!(preview, format!("<image>\n{prompt}"));
    page.find("send").await.click().await.unwrap();
    page.wait_for("#status[data-state='done'], #status[data-state='error']")
        .await;
    page.screenshot("refused_image").await;
    let seen = page
        .js("return {
               state: document.getElementById('status').dataset.state,
               error: document.getElementById('error').textContent,
               shown: !document.getElementById('error').hidden,
               request: window.tesseraPlayground.lastRequest,
             };")
        .await;
    assert_eq!(seen["state"], "error", "{seen}");
    assert_eq!(seen["shown"], true);
    let content = &seen["request"]["messages"][0]["content"];
    assert_eq!(content[2], json!({"type": "text", "text": prompt}));

    // The page shows the API's own message for the same request.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", page.http))
        .header("content-type", "application/json")
        .body(seen["request"].to_string())
        .timeout(DEADLINE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("image/svg+xml"), "{message}");
    assert_eq!(seen["error"], format!("{message} (HTTP 400)"));
    page.close().await;
}
