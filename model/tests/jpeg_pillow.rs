//! JPEG decoding against Pillow: every JPEG in `tests/fixtures/jpeg` must decode to the
//! exact RGB bytes Pillow decodes it to (`Image.open(f).convert("RGB")`, as the reference
//! loads images), saved beside it as `NAME.pillow.png` by that folder's `make.py`.

use std::path::{Path, PathBuf};

use image::RgbImage;
use tessera_model::Error;
use tessera_model::processor::{
    ImageLimits, decode_image, load_image, process_images, read_header,
};

fn jpeg_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jpeg")
}

/// The fixture JPEGs, by name, with the pixels Pillow decodes each to.
fn cases() -> Vec<(String, Vec<u8>, RgbImage)> {
    let dir = jpeg_fixtures();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/jpeg")
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| name.strip_suffix(".jpg").map(str::to_owned))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let jpeg = std::fs::read(dir.join(format!("{name}.jpg"))).unwrap();
            let pillow = image::open(dir.join(format!("{name}.pillow.png")))
                .unwrap_or_else(|e| panic!("{name}.pillow.png: {e}"))
                .to_rgb8();
            (name, jpeg, pillow)
        })
        .collect()
}

/// Fails with the first pixel that differs.
fn assert_same_pixels(name: &str, got: &RgbImage, want: &RgbImage) {
    assert_eq!(got.dimensions(), want.dimensions(), "{name}: size");
    let first = got
        .enumerate_pixels()
        .zip(want.pixels())
        .find(|((_, _, g), w)| g != w);
    if let Some(((x, y, g), w)) = first {
        let differing = got
            .pixels()
            .zip(want.pixels())
            .filter(|(g, w)| g != w)
            .count();
        panic!(
            "{name}: pixel ({x}, {y}) is {:?}, Pillow decodes {:?} ({differing} of {} pixels \
             differ)",
            g.0,
            w.0,
            got.width() * got.height()
        );
    }
}

fn image_error(result: tessera_model::Result<RgbImage>) -> String {
    match result {
        Err(Error::Image(message)) => message,
        other => panic!("expected Error::Image, got {other:?}"),
    }
}

#[test]
fn every_fixture_jpeg_decodes_to_pillows_pixels() {
    let cases = cases();
    // Baseline 4:2:0/4:2:2/4:4:4, progressive, restart markers, optimised tables, grey,
    // CMYK, EXIF-rotated, odd and tiny sizes: see make.py.
    assert!(cases.len() >= 10, "only {} fixture JPEGs", cases.len());
    for (name, jpeg, pillow) in &cases {
        let got =
            decode_image(jpeg, &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same_pixels(name, &got, pillow);
        let header = read_header(jpeg).unwrap();
        assert_eq!(
            (header.format_name(), header.width, header.height),
            ("JPEG", pillow.width(), pillow.height()),
            "{name}: header"
        );
    }
}

#[test]
fn exif_orientation_is_not_applied() {
    let path = jpeg_fixtures().join("exif_orientation_6.jpg");
    let bytes = std::fs::read(&path).unwrap();
    // The file says "rotate 90°" (orientation 6) in its EXIF block.
    let exif = bytes.windows(6).position(|w| w == b"Exif\0\0");
    assert!(exif.is_some(), "the fixture has no EXIF block");
    let rgb = load_image(&path, &ImageLimits::default()).unwrap();
    assert_eq!(rgb.dimensions(), (321, 241), "as stored, not rotated");
}

#[test]
fn a_jpeg_and_the_png_of_its_pillow_pixels_give_the_same_tiles() {
    let dir = jpeg_fixtures();
    let limits = ImageLimits::default();
    let jpeg = load_image(&dir.join("photo_q90_420.jpg"), &limits).unwrap();
    let png = load_image(&dir.join("photo_q90_420.pillow.png"), &limits).unwrap();
    let processor =
        tessera_model::config::ProcessorConfig::from_dir(&dir.join("../tiny-mha-softmax")).unwrap();
    let from_jpeg = process_images(&[jpeg], &processor);
    let from_png = process_images(&[png], &processor);
    assert_eq!(from_jpeg[0].tiling, from_png[0].tiling);
    assert!(
        from_jpeg[0].tiles.len() > 1,
        "the photo is cropped into tiles"
    );
    for (i, (a, b)) in from_jpeg[0]
        .tiles
        .iter()
        .zip(&from_png[0].tiles)
        .enumerate()
    {
        assert_same_pixels(&format!("tile {i}"), a, b);
    }
}

#[test]
fn truncated_and_broken_jpegs_are_clear_errors() {
    let limits = ImageLimits::default();
    let photo = std::fs::read(jpeg_fixtures().join("photo_q90_420.jpg")).unwrap();
    for cut in [photo.len() / 2, photo.len() - 100] {
        let message = image_error(decode_image(&photo[..cut], &limits));
        assert!(
            message.contains("JPEG") && message.contains("truncated"),
            "cut at {cut}: {message}"
        );
    }
    // The header stops before the first scan.
    let message = image_error(decode_image(&photo[..300], &limits));
    assert!(message.contains("JPEG"), "{message}");
    // A start-of-image marker followed by garbage.
    let mut garbage = vec![0xff, 0xd8, 0xff];
    garbage.extend(std::iter::repeat_n(0x5a, 64));
    let message = image_error(decode_image(&garbage, &limits));
    assert!(
        message.contains("cannot decode the JPEG image"),
        "{message}"
    );
    assert!(read_header(&garbage).is_err());
}

/// The frame header's (SOF0) size fields, rewritten to `width` × `height`.
fn with_frame_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline frame header");
    // FFC0, length (2), precision (1), height (2), width (2).
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

#[test]
fn a_jpeg_header_claiming_too_many_pixels_is_rejected_before_decoding() {
    let photo = std::fs::read(jpeg_fixtures().join("photo_q90_420.jpg")).unwrap();
    let huge = with_frame_size(&photo, 60_000, 60_000);
    assert_eq!(
        (
            read_header(&huge).unwrap().width,
            read_header(&huge).unwrap().height
        ),
        (60_000, 60_000)
    );
    let message = image_error(decode_image(&huge, &ImageLimits::default()));
    assert!(
        message.contains("60000x60000") && message.contains("40000000"),
        "{message}"
    );
    let message = image_error(decode_image(&photo, &ImageLimits { max_pixels: 1000 }));
    assert!(message.contains("640x480 = 307200 pixels"), "{message}");
}
