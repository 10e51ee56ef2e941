//! Image bytes → RGB pixels, as the reference's `PIL.Image.open(f).convert("RGB")`.
//!
//! PNG, JPEG, WebP, GIF (first frame) and BMP, the format guessed from the content. The
//! dimensions are read from the header and checked against [`ImageLimits`] before any pixel
//! is decoded; the `image` crate's own allocation limit is set as a second line of defence.
//!
//! Conversion to RGB follows Pillow 13, not the `image` crate's `to_rgb8`:
//! - alpha is dropped, never composited (grey+alpha and RGBA alike);
//! - grey is replicated into R, G, B; palettes are expanded by the decoder;
//! - 16-bit RGB(A) and grey+alpha keep the high byte (`v >> 8`: Pillow unpacks `RGB;16B`,
//!   `RGBA;16B`, `LA;16B` that way) where `to_rgb8` would round `v / 257`;
//! - 16-bit grey is *clipped* to 255 (Pillow opens it as `I;16` and `convert("RGB")` clips),
//!   where `to_rgb8` would scale.
//!
//! JPEG is decoded by libjpeg-turbo, Pillow's own JPEG decoder ([`jpeg`]), so its pixels are
//! Pillow's bit for bit; the other formats by the `image` crate. Known differences from
//! Pillow: lossy WebP (image-webp vs libwebp) is not verified bit-exact; a GIF whose first
//! frame does not cover the logical screen gets black outside the frame, where Pillow uses
//! palette colour 0 or the transparent index's colour. EXIF orientation is ignored by both.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat, ImageReader};
use image::{Pixel, Rgb, RgbImage};

use crate::error::{Error, Result};

mod jpeg;

/// Default cap on the pixel count of one decoded image (width × height).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Bytes per pixel of the widest buffer an enabled decoder produces (16-bit RGBA).
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;
/// Headroom for decoder-internal buffers on top of the output buffer.
const DECODER_SLACK_BYTES: u64 = 64 << 20;

/// Limits applied while decoding untrusted image bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width × height, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl ImageLimits {
    /// The `image` crate's limits: no size limit of its own (ours gives the clearer message)
    /// but an allocation cap just above what an image within `max_pixels` needs.
    fn decoder_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(
            self.max_pixels
                .saturating_mul(MAX_DECODED_BYTES_PER_PIXEL)
                .saturating_add(DECODER_SLACK_BYTES),
        );
        limits
    }

    fn check(&self, format: &str, width: u32, height: u32) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(Error::Image(format!(
                "the {format} image is empty ({width}x{height} pixels)"
            )));
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(Error::Image(format!(
                "the {format} image is {width}x{height} = {pixels} pixels, more than the limit of \
                 {} pixels; downscale it or raise `ImageLimits::max_pixels` (the server's image \
                 pixel limit)",
                self.max_pixels
            )));
        }
        Ok(())
    }
}

const SUPPORTED: &str = "PNG, JPEG, WebP, GIF or BMP";

fn format_name(format: ImageFormat) -> Option<&'static str> {
    match format {
        ImageFormat::Png => Some("PNG"),
        ImageFormat::Jpeg => Some("JPEG"),
        ImageFormat::WebP => Some("WebP"),
        ImageFormat::Gif => Some("GIF"),
        ImageFormat::Bmp => Some("BMP"),
        _ => None,
    }
}

fn decode_error(format: &str, e: ImageError) -> Error {
    match e {
        ImageError::Limits(e) => Error::Image(format!(
            "the {format} image needs more memory to decode than allowed: {e}"
        )),
        e => Error::Image(format!(
            "cannot decode the {format} image (corrupt or truncated data): {e}"
        )),
    }
}

/// What an image's header says, read without decoding any pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// The format, guessed from the content (one of PNG, JPEG, WebP, GIF and BMP).
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl ImageHeader {
    /// The format's name in messages ("JPEG", "PNG", ...).
    pub fn format_name(&self) -> &'static str {
        format_name(self.format).unwrap_or("image")
    }
}

/// The format of `bytes`, guessed from the content, if it is one the processor decodes.
fn supported_format(bytes: &[u8]) -> Result<(ImageFormat, &'static str)> {
    if bytes.is_empty() {
        return Err(Error::Image("the image data is empty (0 bytes)".into()));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        Error::Image(format!(
            "unrecognised image data ({} bytes): not a {SUPPORTED} file",
            bytes.len()
        ))
    })?;
    let name = format_name(format).ok_or_else(|| {
        Error::Image(format!(
            "unsupported image format {format:?}: the image must be {SUPPORTED}"
        ))
    })?;
    Ok((format, name))
}

/// Reads an image's format and size from its header with the decoder [`decode_image`]
/// uses, so that a plan made from headers (the gateway's) agrees with the decoded pixels.
///
/// Errors ([`Error::Image`]) for empty data, formats other than PNG, JPEG, WebP, GIF and
/// BMP, and headers that cannot be read. No limit is applied here.
pub fn read_header(bytes: &[u8]) -> Result<ImageHeader> {
    let (format, name) = supported_format(bytes)?;
    let (width, height) = if format == ImageFormat::Jpeg {
        jpeg::dimensions(bytes)?
    } else {
        let read = || ImageReader::with_format(Cursor::new(bytes), format).into_dimensions();
        catch_unwind(AssertUnwindSafe(read))
            .unwrap_or_else(|_| {
                Err(ImageError::IoError(std::io::Error::other(
                    "the decoder failed on malformed data",
                )))
            })
            .map_err(|e| decode_error(name, e))?
    };
    Ok(ImageHeader {
        format,
        width,
        height,
    })
}

/// Decodes an image file's bytes to RGB the way the reference loads images.
///
/// Errors ([`Error::Image`]) for empty or truncated data, formats other than PNG, JPEG,
/// WebP, GIF and BMP, a zero-sized image, and more than `limits.max_pixels` pixels (checked
/// from the header, before the pixels are decoded). Never panics, even if a decoder would.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    let (format, name) = supported_format(bytes)?;
    if format == ImageFormat::Jpeg {
        return jpeg::decode(bytes, limits);
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.decoder_limits());

    let decode = || -> Result<RgbImage> {
        let decoder = reader.into_decoder().map_err(|e| decode_error(name, e))?;
        let (width, height) = decoder.dimensions();
        limits.check(name, width, height)?;
        let image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(name, e))?;
        Ok(to_rgb_like_pillow(image))
    };
    catch_unwind(AssertUnwindSafe(decode)).unwrap_or_else(|_| {
        Err(Error::Image(format!(
            "the {name} decoder failed on malformed data"
        )))
    })
}

/// Reads and decodes an image file; errors name the path.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, limits).map_err(|e| match e {
        Error::Image(message) => Error::Image(format!("{}: {message}", path.display())),
        other => other,
    })
}

/// Maps every pixel of `im` to RGB with `f` (given the pixel's channels).
fn map_to_rgb<P: Pixel>(
    im: &ImageBuffer<P, Vec<P::Subpixel>>,
    f: impl Fn(&[P::Subpixel]) -> [u8; 3],
) -> RgbImage {
    let (width, height) = im.dimensions();
    let mut out = RgbImage::new(width, height);
    for (dst, src) in out.pixels_mut().zip(im.pixels()) {
        *dst = Rgb(f(src.channels()));
    }
    out
}

/// Pillow's `convert("RGB")` of what Pillow would have opened (see the module notes).
fn to_rgb_like_pillow(image: DynamicImage) -> RgbImage {
    let hi = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(im) => im,
        DynamicImage::ImageRgba8(im) => map_to_rgb(&im, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(im) => map_to_rgb(&im, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(im) => map_to_rgb(&im, |p| [p[0]; 3]),
        DynamicImage::ImageRgb16(im) => map_to_rgb(&im, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(im) => map_to_rgb(&im, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageLumaA16(im) => map_to_rgb(&im, |p| [hi(p[0]); 3]),
        DynamicImage::ImageLuma16(im) => map_to_rgb(&im, |p| [p[0].min(255) as u8; 3]),
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgba};

    fn png_bytes(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn decode(image: DynamicImage) -> RgbImage {
        decode_image(&png_bytes(image), &ImageLimits::default()).unwrap()
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let im = ImageBuffer::from_pixel(2, 2, Rgba([10_u8, 20, 30, 0]));
        assert_eq!(
            decode(DynamicImage::ImageRgba8(im)).get_pixel(1, 1),
            &Rgb([10, 20, 30])
        );
        let im = ImageBuffer::from_pixel(2, 1, LumaA([99_u8, 3]));
        assert_eq!(
            decode(DynamicImage::ImageLumaA8(im)).get_pixel(0, 0),
            &Rgb([99; 3])
        );
    }

    #[test]
    fn sixteen_bit_follows_pillow() {
        let im = ImageBuffer::from_pixel(1, 1, Rgb([0x12ff_u16, 0x00ff, 0xff80]));
        assert_eq!(
            decode(DynamicImage::ImageRgb16(im)).get_pixel(0, 0),
            &Rgb([0x12, 0, 0xff])
        );
        let im = ImageBuffer::from_pixel(1, 1, Rgba([0x8080_u16, 1, 2, 0]));
        assert_eq!(
            decode(DynamicImage::ImageRgba16(im)).get_pixel(0, 0),
            &Rgb([0x80, 0, 0])
        );
        let im = ImageBuffer::from_pixel(1, 1, LumaA([0x7fff_u16, 0]));
        assert_eq!(
            decode(DynamicImage::ImageLumaA16(im)).get_pixel(0, 0),
            &Rgb([0x7f; 3])
        );
        // Grey 16-bit clips (Pillow's I;16 → RGB), it does not scale.
        let im = ImageBuffer::from_fn(2, 1, |x, _| Luma([[200_u16, 4000][x as usize]]));
        let rgb = decode(DynamicImage::ImageLuma16(im));
        assert_eq!(
            (rgb.get_pixel(0, 0), rgb.get_pixel(1, 0)),
            (&Rgb([200; 3]), &Rgb([255; 3]))
        );
    }

    #[test]
    fn limits_report_size_and_limit() {
        let im = RgbImage::from_pixel(100, 50, Rgb([1, 2, 3]));
        let bytes = png_bytes(DynamicImage::ImageRgb8(im));
        let err = decode_image(&bytes, &ImageLimits { max_pixels: 4999 }).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("100x50 = 5000 pixels") && msg.contains("4999"),
            "{msg}"
        );
        assert!(decode_image(&bytes, &ImageLimits { max_pixels: 5000 }).is_ok());
    }

    #[test]
    fn unsupported_formats_are_named() {
        // A TIFF header: recognised, but the decoder is not enabled.
        let err = decode_image(b"II*\0\x08\0\0\0\0\0", &ImageLimits::default()).unwrap_err();
        assert!(
            err.to_string().contains("unsupported image format Tiff"),
            "{err}"
        );
    }
}
