//! JPEG through libjpeg-turbo's decoder, as Pillow decodes it.
//!
//! Pillow (the reference's `Image.open(f).convert("RGB")`) decodes JPEG with
//! libjpeg-turbo, so Tessera does too: the `mozjpeg` crate builds mozjpeg's copy of the
//! libjpeg-turbo decoder from vendored C source with the `cc` crate (no system library, no
//! CMake). Its decoding path is libjpeg-turbo's, unchanged: the accurate integer inverse
//! DCT (`JDCT_ISLOW`, the Loeffler–Ligtenberg–Moschytz factorisation of jidctint.c),
//! "fancy" triangle-filter chroma upsampling, interblock smoothing for progressive scans
//! and libjpeg's fixed-point YCbCr→RGB tables, all left at the defaults Pillow leaves them
//! at. `tests/fixtures/jpeg` holds JPEGs with the pixels Pillow decodes them to; the
//! `jpeg_pillow` test requires them byte for byte.
//!
//! Colour handling follows Pillow's JPEG plugin and `convert("RGB")`:
//! - three components (YCbCr or Adobe RGB): libjpeg converts to RGB;
//! - one component: grey, replicated into R, G and B;
//! - four components (CMYK or Adobe YCCK): libjpeg gives CMYK, which Pillow reads as
//!   inverted (`CMYK;I`, "assume adobe conventions") and converts with
//!   `R = 255 − k' − c'·(255 − k')/255` in its rounded integer form (`cmyk2rgb`), where
//!   `c'` and `k'` are the inverted samples.
//!
//! A file that ends before its last scanline is an error, as Pillow's "image file is
//! truncated" (libjpeg alone would pad it with grey); libjpeg's other warnings (corrupt but
//! decodable data) are ignored, as Pillow ignores them. The EXIF orientation is not applied:
//! Pillow's `open` does not rotate.

// libjpeg's error manager is a C struct of callbacks: installing ours and reading its message
// buffer needs `unsafe` (each block says why it holds).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::mem;
use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys::{JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

use super::ImageLimits;
use crate::error::{Error, Result};

thread_local! {
    /// Set when libjpeg reached the end of the data and inserted an end-of-image marker.
    static RAN_OUT: Cell<bool> = const { Cell::new(false) };
}

/// libjpeg's message for its current error or warning.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: `cinfo.err` is the error manager `error_manager` installed, alive for the
    // whole decode. libjpeg's `format_message` writes at most JMSG_LENGTH_MAX (200) bytes;
    // the binding declares its buffer as a shared 80-byte array, so the pointer type is
    // corrected and a buffer of the real size passed.
    unsafe {
        let err = &*cinfo.err;
        let Some(format) = err.format_message else {
            return format!("libjpeg error {}", err.msg_code);
        };
        let format = mem::transmute::<
            unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &[u8; 80]),
            unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8),
        >(format);
        let mut buffer = [0_u8; 200];
        format(cinfo, buffer.as_mut_ptr());
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    }
}

/// A fatal libjpeg error: unwinds (the C code is built with unwinding) to `catch_unwind`.
extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    resume_unwind(Box::new(message(cinfo)));
}

/// Warnings are ignored, as Pillow ignores them, except running out of data.
extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as in `message`.
    if level < 0 && unsafe { (*cinfo.err).msg_code } == JWRN_JPEG_EOF {
        RAN_OUT.set(true);
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: the struct is plain data (integers, pointers and optional function pointers,
    // for which zero is `None`), and `jpeg_std_error` then sets every field.
    let mut err: jpeg_error_mgr = unsafe { mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Image(format!(
        "cannot decode the JPEG image (corrupt or truncated data): {what}"
    ))
}

/// Runs `f` on the decoder, turning libjpeg's fatal errors (unwound panics) into errors.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    RAN_OUT.set(false);
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "the decoder failed on malformed data".into());
        Err(corrupt(why))
    })
}

/// Width and height from the JPEG header (the markers up to the first scan), no pixels.
pub(super) fn dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    guarded(|| {
        let decoder = Decompress::with_err(error_manager())
            .from_mem(bytes)
            .map_err(corrupt)?;
        let (width, height) = decoder.size();
        Ok((width as u32, height as u32))
    })
}

/// Pillow's `cmyk2rgb` on inverted (`CMYK;I`) samples.
fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    // MULDIV255: a·b/255 rounded, exactly as Pillow computes it.
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let [c, m, y, k] = p.map(|v| 255 - u32::from(v));
    let nk = 255 - k;
    [c, m, y].map(|v| (nk - muldiv255(v, nk)) as u8)
}

/// Decodes a JPEG to RGB as Pillow does; the size is checked against `limits` from the
/// header, before libjpeg allocates anything for the pixels.
pub(super) fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    guarded(|| {
        let decoder = Decompress::with_err(error_manager())
            .from_mem(bytes)
            .map_err(corrupt)?;
        let (width, height) = decoder.size();
        let (width, height) = (width as u32, height as u32);
        limits.check("JPEG", width, height)?;
        let pixels = width as usize * height as usize;
        let rgb = match decoder.color_space() {
            ColorSpace::JCS_GRAYSCALE => {
                let mut grey = vec![0_u8; pixels];
                let mut started = decoder.grayscale().map_err(corrupt)?;
                started.read_scanlines_into(&mut grey).map_err(corrupt)?;
                finish(started)?;
                grey.iter().flat_map(|&v| [v; 3]).collect()
            }
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
                let mut cmyk = vec![[0_u8; 4]; pixels];
                let mut started = decoder
                    .to_colorspace(ColorSpace::JCS_CMYK)
                    .map_err(corrupt)?;
                started.read_scanlines_into(&mut cmyk).map_err(corrupt)?;
                finish(started)?;
                cmyk.into_iter().flat_map(cmyk_to_rgb).collect()
            }
            _ => {
                let mut rgb = vec![0_u8; pixels * 3];
                let mut started = decoder.rgb().map_err(corrupt)?;
                started.read_scanlines_into(&mut rgb).map_err(corrupt)?;
                finish(started)?;
                rgb
            }
        };
        RgbImage::from_raw(width, height, rgb)
            .ok_or_else(|| corrupt("the decoded size does not match the header"))
    })
}

/// Ends decoding once every scanline is read: an error if the data ran out before that.
fn finish<R>(started: mozjpeg::decompress::DecompressStarted<R>) -> Result<()> {
    if RAN_OUT.get() {
        return Err(corrupt("the file ends before the last scanline"));
    }
    // A file cut after its last scanline (only the end marker missing) still decodes.
    drop(started.finish());
    Ok(())
}
