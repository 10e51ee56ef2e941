//! The web playground at `/`: one HTML page, its script and its style sheet, embedded
//! in the binary and served as they are (no build step, nothing fetched from
//! elsewhere). The page talks to `POST /v1/chat/completions` of the same server and
//! draws the answer's grounding boxes over the image.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page, its script and its style sheet.
const INDEX: &str = include_str!("playground/index.html");
const SCRIPT: &str = include_str!("playground/playground.js");
const STYLE: &str = include_str!("playground/playground.css");

/// Browsers revalidate on every load (a new binary's page is picked up at once) and
/// get a 304 while the [`etag`] still matches.
const CACHE_CONTROL: &str = "no-cache";

/// The page may load only its own script, style and the images the user picks, and
/// talk only to this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file: its body, content type and validator.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: &'static str,
}

/// A strong entity tag of `body`: its 64-bit FNV-1a hash, computed at compile time.
const fn etag_of(body: &str) -> [u8; 18] {
    let bytes = body.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    let hex = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut j = 0;
    while j < 16 {
        out[1 + j] = hex[((hash >> (60 - 4 * j)) & 0xf) as usize];
        j += 1;
    }
    out
}

const INDEX_ETAG: [u8; 18] = etag_of(INDEX);
const SCRIPT_ETAG: [u8; 18] = etag_of(SCRIPT);
const STYLE_ETAG: [u8; 18] = etag_of(STYLE);

/// The tag's bytes as text (they are ASCII by construction).
const fn etag_str(tag: &'static [u8; 18]) -> &'static str {
    match std::str::from_utf8(tag) {
        Ok(s) => s,
        Err(_) => panic!("an entity tag is ASCII"),
    }
}

const PAGE: Asset = Asset {
    body: INDEX,
    content_type: "text/html; charset=utf-8",
    etag: etag_str(&INDEX_ETAG),
};
const JS: Asset = Asset {
    body: SCRIPT,
    content_type: "text/javascript; charset=utf-8",
    etag: etag_str(&SCRIPT_ETAG),
};
const CSS: Asset = Asset {
    body: STYLE,
    content_type: "text/css; charset=utf-8",
    etag: etag_str(&STYLE_ETAG),
};

/// The playground's routes: `/`, `/playground.js` and `/playground.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|headers: HeaderMap| async move { serve(&PAGE, &headers) }),
        )
        .route(
            "/playground.js",
            get(|headers: HeaderMap| async move { serve(&JS, &headers) }),
        )
        .route(
            "/playground.css",
            get(|headers: HeaderMap| async move { serve(&CSS, &headers) }),
        )
}

/// `asset`, or a 304 when the request's `If-None-Match` names its tag.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == asset.etag
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = asset.body.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags_are_quoted_hex_of_the_content() {
        let tag = |s: &str| String::from_utf8(etag_of(s).to_vec()).unwrap();
        assert_eq!(tag(""), "\"cbf29ce484222325\"");
        assert_eq!(tag("a"), "\"af63dc4c8601ec8c\"");
        assert_ne!(PAGE.etag, JS.etag);
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        assert!(INDEX.contains(r#"src="/playground.js""#));
        assert!(INDEX.contains(r#"href="/playground.css""#));
        for file in [INDEX, SCRIPT, STYLE] {
            assert!(!file.contains("http://") && !file.contains("https://"));
        }
    }
}
