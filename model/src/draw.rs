//! Draws parsed groundings ([`crate::grounding`]) onto the image they refer to, like the
//! reference demo's `draw_box`: a rectangle per box, one colour per label, the label in a
//! filled tag above the box. Text uses the `font8x8` bitmap font; everything is clipped
//! at the image borders.

use std::path::Path;

use font8x8::{BASIC_FONTS, UnicodeFonts};
use image::{Rgb, RgbImage};

use crate::grounding::{GroundedBox, Grounding};
use crate::{Error, Result};

/// Box and tag colours, assigned to labels in order of first appearance.
const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],   // red
    [60, 180, 75],   // green
    [0, 130, 200],   // blue
    [245, 130, 48],  // orange
    [145, 30, 180],  // purple
    [70, 240, 240],  // cyan
    [240, 50, 230],  // magenta
    [210, 245, 60],  // lime
    [255, 225, 25],  // yellow
    [0, 128, 128],   // teal
    [170, 110, 40],  // brown
    [128, 128, 128], // grey
];

/// Images whose larger side exceeds this get the font at 2×.
const LARGE_IMAGE_PX: u32 = 600;

/// Glyph size of `font8x8` in pixels.
const GLYPH_PX: i64 = 8;

/// A mutable view that ignores writes outside the image.
struct Canvas<'a> {
    image: &'a mut RgbImage,
}

impl Canvas<'_> {
    /// Fills the rectangle `[x0, x1) × [y0, y1)`, clipped to the image.
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, colour: Rgb<u8>) {
        let (w, h) = (
            i64::from(self.image.width()),
            i64::from(self.image.height()),
        );
        let (x0, x1) = (x0.clamp(0, w), x1.clamp(0, w));
        let (y0, y1) = (y0.clamp(0, h), y1.clamp(0, h));
        for y in y0..y1 {
            for x in x0..x1 {
                // In bounds by the clamps above, so the casts are lossless.
                self.image.put_pixel(x as u32, y as u32, colour);
            }
        }
    }

    /// Outline of the box `[x1, x2] × [y1, y2]` (inclusive), `thickness` px inwards.
    fn rectangle(&mut self, b: GroundedBox, thickness: i64, colour: Rgb<u8>) {
        let (x1, y1) = (i64::from(b.x1), i64::from(b.y1));
        let (x2, y2) = (i64::from(b.x2) + 1, i64::from(b.y2) + 1);
        let t = thickness;
        self.fill(x1, y1, x2, (y1 + t).min(y2), colour); // top
        self.fill(x1, (y2 - t).max(y1), x2, y2, colour); // bottom
        self.fill(x1, y1, (x1 + t).min(x2), y2, colour); // left
        self.fill((x2 - t).max(x1), y1, x2, y2, colour); // right
    }

    /// Draws `text` (already ASCII) with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, colour: Rgb<u8>) {
        for (i, c) in text.chars().enumerate() {
            let glyph = BASIC_FONTS.get(c).unwrap_or([0; 8]);
            let gx = x + i as i64 * GLYPH_PX * scale;
            for (row, bits) in (0i64..).zip(glyph) {
                for col in 0..GLYPH_PX {
                    // Bit 0 is the leftmost pixel of a row.
                    if bits & (1 << col) != 0 {
                        let (px, py) = (gx + col * scale, y + row * scale);
                        self.fill(px, py, px + scale, py + scale, colour);
                    }
                }
            }
        }
    }
}

/// The label as the font can draw it: printable ASCII, anything else as `?`.
fn printable(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Black or white, whichever reads better on `background`.
fn text_colour(background: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = background.0.map(u32::from);
    // ITU-R BT.601 luma, scaled by 1000.
    if 299 * r + 587 * g + 114 * b > 128_000 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

/// The colour of each grounding: one palette entry per distinct label, in order of
/// first appearance (wrapping around after the last).
fn label_colours(groundings: &[Grounding]) -> Vec<Rgb<u8>> {
    let mut labels: Vec<&str> = Vec::new();
    groundings
        .iter()
        .map(|g| {
            let i = labels
                .iter()
                .position(|l| *l == g.label)
                .unwrap_or_else(|| {
                    labels.push(&g.label);
                    labels.len() - 1
                });
            Rgb(PALETTE[i % PALETTE.len()])
        })
        .collect()
}

/// Rectangle thickness for an image: `max(2, min(w, h) / 200)` px.
fn thickness(width: u32, height: u32) -> i64 {
    i64::from((width.min(height) / 200).max(2))
}

/// A copy of `image` with every box of `groundings` drawn on it (coordinates are 0…999
/// of this image) and each non-empty label in a tag above its box's top-left corner.
/// Boxes come first, tags on top; a tag that would leave the image is moved inside.
pub fn draw_groundings(image: &RgbImage, groundings: &[Grounding]) -> RgbImage {
    let mut out = image.clone();
    let (width, height) = out.dimensions();
    let t = thickness(width, height);
    let scale: i64 = if width.max(height) > LARGE_IMAGE_PX {
        2
    } else {
        1
    };
    let pad = scale;

    let mut tags = Vec::new();
    let mut canvas = Canvas { image: &mut out };
    for (g, colour) in groundings.iter().zip(label_colours(groundings)) {
        for b in &g.boxes {
            let px = b.to_pixels(width, height);
            canvas.rectangle(px, t, colour);
            if !g.label.is_empty() {
                tags.push((px, printable(&g.label), colour));
            }
        }
    }

    let (w, h) = (i64::from(width), i64::from(height));
    for (b, label, colour) in tags {
        let tag_w = label.chars().count() as i64 * GLYPH_PX * scale + 2 * pad;
        let tag_h = GLYPH_PX * scale + 2 * pad;
        // Left-aligned with the box, shifted left if it would leave on the right.
        let x = i64::from(b.x1).min(w - tag_w).max(0);
        // Above the box, or just inside its top edge when there is no room above.
        let above = i64::from(b.y1) - tag_h;
        let y = if above >= 0 {
            above
        } else {
            i64::from(b.y1).min(h - tag_h).max(0)
        };
        canvas.fill(x, y, x + tag_w, y + tag_h, colour);
        canvas.text(x + pad, y + pad, &label, scale, text_colour(colour));
    }
    out
}

/// Writes `image` as a PNG file.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(source) => Error::io(path, source),
            other => Error::Image(format!("cannot write {}: {other}", path.display())),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grounding::{NormalizedBox, parse_groundings};

    const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

    fn blank(w: u32, h: u32) -> RgbImage {
        RgbImage::from_pixel(w, h, WHITE)
    }

    fn one(label: &str, x1: u32, y1: u32, x2: u32, y2: u32) -> Grounding {
        Grounding {
            label: label.to_string(),
            boxes: vec![NormalizedBox { x1, y1, x2, y2 }],
        }
    }

    #[test]
    fn box_edges_change_and_inside_does_not() {
        let img = blank(400, 300);
        let drawn = draw_groundings(&img, &[one("", 250, 250, 750, 750)]);
        let b = NormalizedBox {
            x1: 250,
            y1: 250,
            x2: 750,
            y2: 750,
        }
        .to_pixels(400, 300);
        let red = Rgb(PALETTE[0]);
        for (x, y) in [
            (b.x1, b.y1),
            (b.x2, b.y2),
            (b.x1 + 1, (b.y1 + b.y2) / 2), // left edge, 2 px thick
            (b.x2 - 1, (b.y1 + b.y2) / 2), // right edge
            ((b.x1 + b.x2) / 2, b.y1 + 1), // top edge
            ((b.x1 + b.x2) / 2, b.y2),     // bottom edge
        ] {
            assert_eq!(*drawn.get_pixel(x, y), red, "edge pixel ({x}, {y})");
        }
        // Thickness is 2 here: the third pixel in is untouched, as is the middle.
        assert_eq!(*drawn.get_pixel(b.x1 + 2, (b.y1 + b.y2) / 2), WHITE);
        assert_eq!(
            *drawn.get_pixel((b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2),
            WHITE
        );
        // Outside the box nothing changes (no label, so no tag).
        assert_eq!(*drawn.get_pixel(b.x1 - 1, b.y1 - 1), WHITE);
        let changed = drawn.pixels().filter(|p| **p != WHITE).count();
        let (bw, bh) = (b.x2 - b.x1 + 1, b.y2 - b.y1 + 1);
        assert_eq!(changed as u32, bw * bh - (bw - 4) * (bh - 4));
    }

    #[test]
    fn thickness_scales_with_image() {
        assert_eq!(thickness(300, 300), 2);
        assert_eq!(thickness(1200, 700), 3);
        let drawn = draw_groundings(&blank(700, 700), &[one("", 0, 100, 999, 999)]);
        let y = NormalizedBox {
            x1: 0,
            y1: 100,
            x2: 0,
            y2: 0,
        }
        .to_pixels(700, 700)
        .y1;
        for dy in 0..3 {
            assert_ne!(*drawn.get_pixel(350, y + dy), WHITE);
        }
        assert_eq!(*drawn.get_pixel(350, y + 3), WHITE);
    }

    #[test]
    fn label_tag_above_box() {
        let img = blank(400, 300);
        let drawn = draw_groundings(&img, &[one("cat", 250, 500, 750, 900)]);
        let b = NormalizedBox {
            x1: 250,
            y1: 500,
            x2: 750,
            y2: 900,
        }
        .to_pixels(400, 300);
        let red = Rgb(PALETTE[0]);
        // Tag: 3 glyphs × 8 px + 2 px padding wide, 10 px high, bottom on the box top.
        let (tag_w, tag_h) = (3 * 8 + 2, 10);
        assert_eq!(*drawn.get_pixel(b.x1, b.y1 - 1), red);
        assert_eq!(*drawn.get_pixel(b.x1, b.y1 - tag_h), red);
        assert_eq!(*drawn.get_pixel(b.x1 + tag_w - 1, b.y1 - tag_h), red);
        assert_eq!(*drawn.get_pixel(b.x1, b.y1 - tag_h - 1), WHITE);
        assert_eq!(*drawn.get_pixel(b.x1 + tag_w, b.y1 - tag_h), WHITE);
        // The glyphs are drawn in the tag's text colour.
        let ink = text_colour(red);
        let glyph_pixels = (b.x1..b.x1 + tag_w)
            .flat_map(|x| (b.y1 - tag_h..b.y1).map(move |y| (x, y)))
            .filter(|&(x, y)| *drawn.get_pixel(x, y) == ink)
            .count();
        let font_pixels: u32 = ['c', 'a', 't']
            .iter()
            .map(|&c| {
                BASIC_FONTS
                    .get(c)
                    .unwrap()
                    .iter()
                    .map(|r| r.count_ones())
                    .sum::<u32>()
            })
            .sum();
        assert_eq!(glyph_pixels as u32, font_pixels);
    }

    #[test]
    fn tag_moves_inside_at_the_top_and_right() {
        let img = blank(200, 100);
        let drawn = draw_groundings(&img, &[one("a long label here", 900, 0, 999, 500)]);
        // No room above or to the right: the tag sits at the top, flush with the right edge.
        let red = Rgb(PALETTE[0]);
        assert_eq!(*drawn.get_pixel(199, 0), red);
        let tag_w = 17 * 8 + 2;
        assert_eq!(*drawn.get_pixel(200 - tag_w, 5), red);
        assert_eq!(*drawn.get_pixel(200 - tag_w - 1, 5), WHITE);
    }

    #[test]
    fn colours_per_label() {
        let img = blank(300, 300);
        let gs = [
            one("a", 0, 500, 100, 600),
            one("b", 500, 500, 600, 600),
            one("a", 800, 500, 900, 600),
        ];
        let drawn = draw_groundings(&img, &gs);
        let at = |x: u32| {
            *drawn.get_pixel(
                NormalizedBox {
                    x1: x,
                    y1: 550,
                    x2: 0,
                    y2: 0,
                }
                .to_pixels(300, 300)
                .x1,
                160,
            )
        };
        assert_eq!(at(0), Rgb(PALETTE[0]));
        assert_eq!(at(500), Rgb(PALETTE[1]));
        assert_eq!(at(800), Rgb(PALETTE[0]));
    }

    #[test]
    fn out_of_bounds_and_odd_inputs_do_not_panic() {
        let gs = [
            one("édge ✨ 猫", 0, 0, 999, 999),
            one("huge", u32::MAX, u32::MAX, u32::MAX, u32::MAX),
            one("", 999, 999, 999, 999),
            one("x", 0, 0, 0, 0),
            one(&"w".repeat(500), 998, 998, 999, 999),
        ];
        for (w, h) in [(0, 0), (1, 1), (3, 700), (640, 480), (1000, 20)] {
            let drawn = draw_groundings(&blank(w, h), &gs);
            assert_eq!(drawn.dimensions(), (w, h));
        }
        assert_eq!(printable("édge ✨ 猫"), "?dge ? ?");
    }

    #[test]
    fn save_png_round_trips() {
        let mut img = blank(37, 23);
        img.put_pixel(5, 7, Rgb([1, 2, 3]));
        let path = std::env::temp_dir().join(format!("tessera-draw-{}.png", std::process::id()));
        save_png(&img, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, img);
        let bad = Path::new("/nonexistent-dir/x.png");
        assert!(matches!(save_png(&img, bad), Err(Error::Io { .. })));
    }

    /// Writes `tessera-grounding-demo.png` to the temp dir for a look by eye.
    #[test]
    fn demo_png() {
        let (w, h) = (800, 560);
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(60 + x * 120 / w) as u8, (90 + y * 100 / h) as u8, 140])
        });
        let answer = "<|grounding|>A photo of <|ref|>The cat<|/ref|><|det|>[[60, 300, 420, 950]]<|/det|> \
            next to <|ref|>two dogs<|/ref|><|det|>[[480, 420, 700, 980], [720, 500, 990, 990]]<|/det|> \
            under <|ref|>the sky<|/ref|><|det|>[[0, 0, 999, 250]]<|/det|> and <|ref|>café ☕<|/ref|>\
            <|det|>[[550, 120, 800, 380]]<|/det|>.";
        let groundings = parse_groundings(answer);
        assert_eq!(groundings.len(), 4);
        let drawn = draw_groundings(&img, &groundings);
        let path = std::env::temp_dir().join("tessera-grounding-demo.png");
        save_png(&drawn, &path).unwrap();
        assert_ne!(drawn, img);
    }
}
