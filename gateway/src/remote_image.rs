//! Remote images of the OpenAI API: `image_url` parts with an `http(s)` URL. They
//! are fetched only when the gateway runs with `--allow-remote-images`, each within
//! a time limit and a byte cap (counted as the body streams in), following
//! redirects to http(s) URLs only, and kept only if the bytes are an image.
//!
//! Refusals are reasons for the client, never the URL itself: signed URLs carry
//! secrets in their query strings.
//!
//! Unless `--allow-private-image-hosts`, only public addresses are fetched from: a
//! host name is resolved by the gateway and only its public addresses are connected
//! to, and a URL or redirect naming a loopback, private, link-local or otherwise
//! non-public IP address is refused, so a client cannot make the gateway reach
//! services beside it (cloud metadata endpoints, the cluster's internal ports).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;
use reqwest::{Client, Url};
use tessera_model::processor::read_header;
use tessera_proto::v1;
use tokio::task::JoinSet;

use crate::error::{Error, Result};

/// Default for `--remote-image-timeout-seconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;
/// Default for `--remote-image-max-bytes`: 20 MiB.
pub const DEFAULT_MAX_BYTES: usize = 20 << 20;
/// Most redirects one fetch follows.
const MAX_REDIRECTS: usize = 5;

/// The remote-image flags of the gateway (and `tessera up`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RemoteImageConfig {
    /// Fetch `http(s)` image URLs in OpenAI `image_url` parts [default: only
    /// `data:` URIs are accepted].
    #[arg(
        long,
        env = "TESSERA_ALLOW_REMOTE_IMAGES",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_remote_images: bool,
    /// Seconds one remote image may take, from connecting to its last byte.
    #[arg(
        long,
        env = "TESSERA_REMOTE_IMAGE_TIMEOUT_SECONDS",
        default_value_t = DEFAULT_TIMEOUT_SECONDS
    )]
    pub remote_image_timeout_seconds: u64,
    /// Refuse remote images larger than this many bytes.
    #[arg(
        long,
        env = "TESSERA_REMOTE_IMAGE_MAX_BYTES",
        default_value_t = DEFAULT_MAX_BYTES
    )]
    pub remote_image_max_bytes: usize,
    /// Also fetch remote images from loopback, private and link-local addresses
    /// [default: public addresses only, checked after DNS resolution and on every
    /// redirect].
    #[arg(
        long,
        env = "TESSERA_ALLOW_PRIVATE_IMAGE_HOSTS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_private_image_hosts: bool,
}

impl Default for RemoteImageConfig {
    fn default() -> Self {
        Self {
            allow_remote_images: false,
            remote_image_timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
            remote_image_max_bytes: DEFAULT_MAX_BYTES,
            allow_private_image_hosts: false,
        }
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local,
/// unspecified, broadcast, multicast, shared (CGNAT), documentation, benchmarking or
/// reserved; IPv4 inside IPv6 (mapped, NAT64) is judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::LOCALHOST)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64) // shared address space 100.64/10
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18/15
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || a >= 240) // reserved
}

/// Why a URL naming a non-public IP address is refused.
fn private_address(host: &str) -> String {
    format!(
        "the image URL names {host}, which is not a public address; images are fetched \
         only from public addresses unless the gateway runs with \
         --allow-private-image-hosts"
    )
}

/// The IP address a URL's host is, when it is one.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// A resolver that keeps only the public addresses of a name (and fails when it has
/// none), so that no connection goes to a private address.
#[derive(Debug)]
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                let why = format!(
                    "{host} resolves only to addresses that are not public; images are \
                     fetched only from public addresses unless the gateway runs with \
                     --allow-private-image-hosts"
                );
                return Err(why.into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

/// Fetches the remote images of a request, or refuses them when they are off.
#[derive(Debug, Clone)]
pub struct RemoteImages {
    fetcher: Option<Fetcher>,
    /// Most images per request: a longer list is refused before fetching any.
    max_images: usize,
}

#[derive(Debug, Clone)]
struct Fetcher {
    client: Client,
    timeout: Duration,
    max_bytes: usize,
    /// Refuse non-public addresses.
    public_only: bool,
}

impl RemoteImages {
    /// Remote images as `cfg` sets them (checked by `Config::validate`), for requests
    /// of at most `max_images` images.
    pub fn new(cfg: &RemoteImageConfig, max_images: usize) -> Result<Self> {
        if !cfg.allow_remote_images {
            return Ok(Self::disabled());
        }
        let timeout = Duration::from_secs(cfg.remote_image_timeout_seconds);
        let public_only = !cfg.allow_private_image_hosts;
        let redirects = Policy::custom(move |attempt| {
            let scheme = attempt.url().scheme().to_owned();
            let private = literal_ip(attempt.url()).filter(|ip| public_only && !is_public(*ip));
            if let Some(ip) = private {
                attempt.error(private_address(&ip.to_string()))
            } else if !matches!(scheme.as_str(), "http" | "https") {
                attempt.error(format!(
                    "it redirected to a {scheme}: URL; only http(s) is followed"
                ))
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("it redirected more than {MAX_REDIRECTS} times"))
            } else {
                attempt.follow()
            }
        });
        let mut client = Client::builder();
        if public_only {
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        let client = client
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .redirect(redirects)
            .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("cannot set up the remote image client: {e}")))?;
        Ok(Self {
            fetcher: Some(Fetcher {
                client,
                timeout,
                max_bytes: cfg.remote_image_max_bytes,
                public_only,
            }),
            max_images,
        })
    }

    /// Remote images refused (the default).
    pub fn disabled() -> Self {
        Self {
            fetcher: None,
            max_images: usize::MAX,
        }
    }

    /// Fetches `urls` side by side; the images in order, or the index of the first
    /// URL refused and why.
    pub async fn fetch_all(
        &self,
        urls: Vec<String>,
    ) -> std::result::Result<Vec<v1::Image>, (usize, String)> {
        let Some(fetcher) = &self.fetcher else {
            return Err((
                0,
                "remote image URLs are not enabled on this server; send the image inline as \
                 a data:image/...;base64,... URI, or start the gateway with \
                 --allow-remote-images"
                    .to_owned(),
            ));
        };
        if urls.len() > self.max_images {
            return Err((
                self.max_images,
                format!(
                    "the request has {} remote images, more than this server's limit of {} \
                     images",
                    urls.len(),
                    self.max_images
                ),
            ));
        }
        let mut fetches = JoinSet::new();
        for (k, url) in urls.into_iter().enumerate() {
            let fetcher = fetcher.clone();
            fetches.spawn(async move { (k, fetcher.fetch(&url).await) });
        }
        let mut images = vec![None; fetches.len()];
        while let Some(joined) = fetches.join_next().await {
            let (k, fetched) =
                joined.map_err(|e| (0, format!("fetching the image failed: {e}")))?;
            images[k] = Some(fetched.map_err(|reason| (k, reason))?);
        }
        Ok(images.into_iter().flatten().collect())
    }
}

impl Fetcher {
    /// The image at `url`, or why it is refused.
    async fn fetch(&self, url: &str) -> std::result::Result<v1::Image, String> {
        let url = Url::parse(url).map_err(|e| format!("the image URL is not valid: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{}: image URLs are not supported; use http(s) or a data: URI",
                url.scheme()
            ));
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        if let Some(ip) = literal_ip(&url).filter(|ip| self.public_only && !is_public(*ip)) {
            return Err(private_address(&ip.to_string()));
        }
        let data = tokio::time::timeout(self.timeout, self.download(url))
            .await
            .map_err(|_| self.too_slow())??;
        if image::guess_format(&data.bytes).is_err() {
            return Err(format!(
                "the image URL on {host} did not return an image (it sent {} bytes of {})",
                data.bytes.len(),
                data.content_type.as_deref().unwrap_or("an unknown type")
            ));
        }
        let header = read_header(&data.bytes).map_err(|e| match e {
            tessera_model::Error::Image(why) => {
                format!("the image URL on {host} returned an unreadable image: {why}")
            }
            e => format!("the image URL on {host} returned an unreadable image: {e}"),
        })?;
        Ok(v1::Image {
            data: data.bytes.into(),
            mime_type: header.format.to_mime_type().to_owned(),
        })
    }

    /// The body at `url`, refused past the byte cap (announced or streamed).
    async fn download(&self, url: Url) -> std::result::Result<Body, String> {
        let host = url.host_str().unwrap_or_default().to_owned();
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.failure(&host, e))?;
        let status = response.status();
        if status.is_redirection() {
            // reqwest hands back a redirect it cannot follow (to a non-http(s) URL).
            return Err(format!(
                "the image URL on {host} redirected to a location that is not an http(s) URL \
                 (HTTP {status}); only http(s) redirects are followed"
            ));
        }
        if !status.is_success() {
            return Err(format!(
                "the image URL on {host} answered HTTP {status}; check that it is public and \
                 still exists"
            ));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(self.too_large());
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failure(&host, e))? {
            if bytes.len() + chunk.len() > self.max_bytes {
                return Err(self.too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Body {
            bytes,
            content_type,
        })
    }

    fn too_large(&self) -> String {
        format!(
            "the remote image is larger than this server's limit of {} bytes \
             (--remote-image-max-bytes); send a smaller image",
            self.max_bytes
        )
    }

    fn too_slow(&self) -> String {
        format!(
            "fetching the remote image took longer than {}s (--remote-image-timeout-seconds); \
             send it inline as a data: URI",
            self.timeout.as_secs()
        )
    }

    fn failure(&self, host: &str, e: reqwest::Error) -> String {
        if e.is_timeout() {
            return self.too_slow();
        }
        let e = e.without_url();
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        format!("fetching the image from {host} failed: {reason}")
    }
}

/// A fetched body and the type its server gave it.
struct Body {
    bytes: Vec<u8>,
    content_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "198.18.0.1",
            "192.0.2.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(!is_public(ip), "{private} is not public");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(ip), "{public} is public");
        }
    }

    #[test]
    fn literal_hosts_are_read_from_urls() {
        let ip = |u: &str| literal_ip(&Url::parse(u).unwrap());
        assert_eq!(
            ip("http://127.0.0.1:8080/a.png"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(ip("http://[::1]/a.png"), Some("::1".parse().unwrap()));
        assert_eq!(ip("http://example.com/a.png"), None);
        // The URL parser normalizes other spellings of an IPv4 address.
        assert_eq!(ip("http://2130706433/"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip("http://0x7f.1/"), Some("127.0.0.1".parse().unwrap()));
    }
}
